"""The ATen backward kernels the lean layers call directly give what autograd gives, bit for bit: a PyTorch that
renames them or changes what they compute fails here."""
import pytest
import torch
import torch.nn.functional as F

from slimtune.core.aten_grads import conv_grads, conv_input_grad, gelu_grad, silu_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_silu_and_gelu_grads_are_autograds(dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 8, generator=gen) * 3).to(dtype).requires_grad_()
    grad = torch.randn(3, 5, 8, generator=gen).to(dtype)
    assert torch.equal(silu_grad(grad, x.detach()), torch.autograd.grad(F.silu(x), x, grad)[0])
    for approximate in ("none", "tanh"):
        want = torch.autograd.grad(F.gelu(x, approximate=approximate), x, grad)[0]
        assert torch.equal(gelu_grad(grad, x.detach(), approximate), want)
    view = x.detach()[..., 4:]  # the lean GEGLU's gate: a strided half of its projection
    assert torch.equal(gelu_grad(grad[..., :4], view),
                       torch.autograd.grad(F.gelu(x[..., 4:]), x, grad[..., :4])[0][..., 4:])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("dims, stride, padding, dilation, groups, size", [
    (1, (1,), (0,), (1,), 1, 7), (2, (1, 1), (1, 1), (1, 1), 1, 8), (2, (2, 2), (1, 0), (1, 2), 2, 7),
    (2, (2, 2), (1, 1), (1, 1), 1, 8), (3, (2, 1, 1), (1, 1, 0), (1, 1, 1), 1, 5)])
def test_conv_input_grad_is_autograds(device, dtype, dims, stride, padding, dilation, groups, size,
                                     deterministic_cudnn):
    """The lean convolution's backward gives autograd's input gradient bit for bit, odd sizes under stride 2 included
    (8 rows: one dropped). On CUDA with cuDNN's deterministic algorithms: its default backward-data algorithms for
    float64 and 3-D kernels accumulate with atomics, so two runs of autograd itself can differ in the last bits
    (RESULTS.md runs 85, 87, 88): ``deterministic_cudnn``."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, *[size] * dims, generator=gen).to(device, dtype).requires_grad_()
    weight = torch.randn(6, 4 // groups, *[3] * dims, generator=gen).to(device, dtype)
    y = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims](x, weight, None, stride, padding, dilation, groups)
    grad = torch.randn(y.shape, generator=gen).to(device, dtype)
    got = conv_input_grad(grad, weight, tuple(x.shape), stride, padding, dilation, groups)
    want = torch.autograd.grad(y, x, grad)[0]
    assert got.shape == x.shape and torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("need", [(True, True, True), (True, False, False), (False, True, False), (False, False, True)])
def test_conv_grads_are_autograds(dtype, need):
    """A ResNet block's Function takes its LoCon convolutions' input, weight and bias gradients from the op autograd's
    node runs: any of them, bit for bit."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 7, 8, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(6, 2, 3, 3, generator=gen).to(dtype).requires_grad_()
    bias = torch.randn(6, generator=gen).to(dtype).requires_grad_()
    y = F.conv2d(x, weight, bias, (2, 1), (1, 1), (1, 2), 2)
    grad = torch.randn(y.shape, generator=gen).to(dtype)
    want = torch.autograd.grad(y, (x, weight, bias), grad)
    got = conv_grads(grad, x.detach(), weight.detach(), (2, 1), (1, 1), (1, 2), 2, need)
    for wanted, g, w in zip(need, got, want):
        assert (g is None) if not wanted else torch.equal(g, w)
