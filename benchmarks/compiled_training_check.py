"""Does a step with ``compile_layers`` train? Each case builds a session (``slimtune.memory.profile``), compiles
its decoder layers or not, and runs a few steps: the losses and, after each of the first two backward passes, how
many trainable tensors got no gradient and the sums of the gradients' norms. Written when compiled DoRA's losses did
not move on CUDA (run 145, an H200) while the same step on the CPU trained::

    python benchmarks/compiled_training_check.py                      # the cases below, on CUDA
    python benchmarks/compiled_training_check.py --cases tiny-llama:dora:bfloat16:compiled
"""
from __future__ import annotations

import argparse
import time

import torch

import slimtune
from slimtune.core import compute
from slimtune.memory.options import ProfileOptions
from slimtune.memory.profile import TrainingSession
from slimtune.models.layers import compile_layers

CASES = ["tiny-llama:dora:bfloat16:compiled", "tiny-llama:dora:bfloat16:eager", "tiny-llama:dora:float32:compiled",
         "tiny-llama:dora:bfloat16:compiled:noprepass", "tiny-llama:lora:bfloat16:compiled",
         "tiny-llama:dora:bfloat16:compiled:nofp32out", "tiny-llama:dora:bfloat16:compiled:nosiblings",
         "llama-3.2-3b:dora:bfloat16:compiled",
         "llama-3.2-3b:dora:bfloat16:compiled:nofp32out"]


def run_case(case: str, device: str, steps: int) -> str:
    """One case's table row; its toggles are undone after it, also where it fails (the next case starts clean)."""
    preset, method, dtype, mode, *flags = case.split(":")
    torch.compiler.reset()
    slimtune.set_dora_prepass("noprepass" not in flags)
    slimtune.set_sibling_fusion("nosiblings" not in flags)
    # nofp32out: bf16 GEMMs that write fp32 (compute.fp32_out_gemm) taken as unavailable (this diagnostic's switch,
    # through the module's private probe table)
    compute._MM_OUT_DTYPE.clear()
    if "nofp32out" in flags:
        compute._MM_OUT_DTYPE.update({torch.bfloat16: False, torch.float16: False})
    try:
        if "probed" in flags:  # the fp32-output GEMM probed eagerly now, not first while Dynamo traces
            compute.fp32_out_gemm(torch.ones(1, device=device, dtype=torch.bfloat16))
        options = ProfileOptions(method=method, backend="slimtune", release_outputs=True, memory="fast",
                                 preset=preset, rank=8 if preset == "tiny-llama" else 32, batch=2, seq=64,
                                 device=device, dtype=dtype)
        session = TrainingSession.prepare(options)
        if mode == "compiled":
            compile_layers(session.model)
        losses, report, start = [], "", time.perf_counter()
        for step in range(steps):
            with session.attention():
                loss, out = session._forward()
                del out
                loss.backward()
            if step in (0, 1):  # the first step (eager where siblings learn) and the first compiled one
                report += _gradient_report(session.model, step, loss)
            session.optimizer.step()
            session.optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        seconds = time.perf_counter() - start
    finally:
        slimtune.set_dora_prepass(True)
        slimtune.set_sibling_fusion(True)
        compute._MM_OUT_DTYPE.clear()
    return f"| {case} | {' '.join(f'{x:.4f}' for x in losses)} | {report} | {seconds:.1f} |"


def _gradient_report(model: torch.nn.Module, step: int, loss: torch.Tensor) -> str:
    """Per kind of trainable tensor (lora_A, lora_B, magnitude): how many have no gradient, their norms' sum."""
    named = [(n, p.grad) for n, p in model.named_parameters() if p.requires_grad]
    kinds = sorted({n.rsplit(".", 1)[-1] for n, _ in named})
    missing = {k: sum(g is None for n, g in named if n.endswith(k)) for k in kinds}
    norms = {k: f"{sum(float(g.float().norm()) for n, g in named if n.endswith(k) and g is not None):.3g}"
             for k in kinds}
    return (f"step {step}: of {len(named)}, no grad {missing}, grad norm sums {norms}, "
            f"loss requires grad {loss.requires_grad}. ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=CASES,
                        help="preset:method:dtype:compiled|eager, then flags: noprepass, nofp32out, nosiblings, "
                             "probed")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(f"torch {torch.__version__} · {args.device}", flush=True)
    print("| case | losses | first two backward passes | s |\n|---|---|---|---|", flush=True)
    for case in args.cases:
        try:
            print(run_case(case, args.device, args.steps), flush=True)
        except Exception as error:  # a diagnostic: report and go on to the next case
            print(f"| {case} | failed: {type(error).__name__}: {str(error).splitlines()[0][:200]} | | |", flush=True)


if __name__ == "__main__":
    main()
