"""The ATen backward kernels the lean layers call directly give what autograd gives, bit for bit: a PyTorch that
renames them or changes what they compute fails here."""
import pytest
import torch
import torch.nn.functional as F

from slimtune.core.aten_grads import gelu_grad, silu_grad


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
