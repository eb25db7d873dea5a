"""Whether autograd's own convolution input gradient repeats bit for bit on CUDA (cuDNN's default algorithms): 20
runs per dtype and kernel dimension, the count of distinct results. Diagnostic for tests/core/test_aten_grads.py."""
import torch, torch.nn.functional as F
for dtype in (torch.float64, torch.float32):
    for dims in (2, 3):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 4, *[8] * dims, generator=g).to("cuda", dtype).requires_grad_()
        w = torch.randn(6, 4, *[3] * dims, generator=g).to("cuda", dtype)
        conv = F.conv2d if dims == 2 else F.conv3d
        y = conv(x, w, None, 1, 1)
        go = torch.randn(y.shape, generator=g).to("cuda", dtype)
        runs = [torch.autograd.grad(y, x, go, retain_graph=True)[0] for _ in range(20)]
        print(f"autograd's conv input grad, {dtype}, {dims}-D, 20 runs: {len({r.cpu().numpy().tobytes() for r in runs})} distinct results")
