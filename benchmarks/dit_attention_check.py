"""Which SDPA backend breaks the ~4B DiT's backward (run 41: cuDNN attention's backward failed, ``mha_graph.execute``).

Runs HRA r=32 (and LoRA r=32) on ``flux-dit-4b``, batch 1, bf16, 2 steps each, in this process: with PyTorch's
default SDPA backends, and with cuDNN attention excluded (``torch.nn.attention.sdpa_kernel``: flash, efficient,
math). Prints status, peak and step time per configuration, and the strides of the tensors that reach SDPA.

    python benchmarks/dit_attention_check.py
"""
from __future__ import annotations

import contextlib
import gc
import sys
import time

import _common  # noqa: F401 - slimtune from this checkout
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from slimtune.memory.options import ProfileOptions
from slimtune.memory.profile import TrainingSession

STRIDES: set = set()


class ShowStrides(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            STRIDES.add(tuple((tuple(a.shape), a.stride(), a.is_contiguous()) for a in args[:3]))
        return func(*args, **(kwargs or {}))


def run(method: str, backend: str, no_cudnn: bool, ckpt: bool) -> str:
    options = ProfileOptions(preset="flux-dit-4b", method=method, rank=32, batch=1, steps=2, backend=backend,
                             grad_checkpointing=ckpt, release_outputs=True)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        session = TrainingSession.prepare(options)
        ctx = sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]) \
            if no_cudnn else contextlib.nullcontext()
        times = []
        with ctx, ShowStrides():
            for _ in range(2):
                t0 = time.perf_counter()
                session.train_step()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        status = f"ok peak {torch.cuda.max_memory_allocated() / 1e9:.2f} GB step {times[-1]:.3f} s"
        del session
    except Exception as exc:  # noqa: BLE001
        status = f"{type(exc).__name__}: {str(exc).splitlines()[0][:140]}"
    return status


def main() -> int:
    for method, backend, no_cudnn, ckpt in (("hra", "slimtune", True, True), ("hra", "slimtune", True, False),
                                            ("hra", "peft-bf16", True, True), ("lora", "slimtune", False, True),
                                            ("hra", "slimtune", False, True)):
        status = run(method, backend, no_cudnn, ckpt)
        print(f"{method:5} {backend:10} cudnn {'off' if no_cudnn else 'on ':3} GC {'on ' if ckpt else 'off'}: "
              f"{status}", flush=True)
        if "AcceleratorError" in status:
            break
    for s in sorted(STRIDES)[:6]:
        print("sdpa q/k/v:", s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
