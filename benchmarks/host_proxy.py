"""The host's share of a training step, measurable without a GPU: a Llama with tiny widths (hidden 32: the arithmetic
is next to nothing), so a step's time on the CPU is its Python, dispatcher and autograd work — what decides a
host-bound GPU step (the 3B shape at seq 512 on the lent machines). slimtune and PEFT-bf16 (and slimtune with its
sibling layers running alone, ``alone``) take turns, one step each, in rotating order; each ratio is taken within a
round, then the median over rounds (as ``paired_steps.py`` does on the GPU).

It is a proxy: a CUDA step adds a launch per kernel on top of each op's dispatch, so fewer kernels count for more
there: the table also counts, per build, the ATen calls of one step that would launch a kernel on a GPU (views and
allocations left out). Run 56 (``RESULTS.md``) set it beside the GPU's paired ratios.

    python benchmarks/host_proxy.py                       # LoRA, 28 layers, 40 rounds, one thread
    python benchmarks/host_proxy.py --method dora --layers 8
    python benchmarks/host_proxy.py --before DIR          # also an earlier copy of the package (``before``)
    python benchmarks/host_proxy.py --stripped            # also slimtune without its lean RMSNorm / SwiGLU
    python benchmarks/host_proxy.py --compile             # every decoder layer compiled, on every side

``--before DIR``: DIR holds an earlier copy of the package as ``slimtune_before`` (``git archive REF slimtune``, renamed),
as ``paired_steps.py`` takes it; its model joins the rounds as ``before``, and the table gains a "÷ before" column.
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from typing import Any, Callable, Sequence

from _common import environment_line, markdown_table, write_out_text
from paired_steps import strip_lean, strip_siblings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import slimtune

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KINDS = ("slimtune", "alone", "peft-bf16")
#: the lean Llama layers the ``stripped`` kind runs without (``--stripped``): on the CPU they run PyTorch's ops inside
#: a Python Function where a GPU runs one Triton launch, so ``slimtune`` here pays host work a GPU step does not
LLAMA_LEAN = ("rmsnorm", "mlp")


def build_step(kind: str, method: str, layers: int, rank: int, compiled: bool = False) -> Callable[[], torch.Tensor]:
    """One training step (forward, backward, AdamW with foreach as on CUDA, zero_grad) of a tiny-width Llama with
    ``method`` on every projection, built by ``kind``; ``compiled``: every decoder layer through ``compile_layers``
    (the earlier copy's own for ``before``), on every side."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    model = transformers.LlamaForCausalLM(config).train()
    dora = method == "dora"
    if kind == "peft-bf16":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                           use_dora=dora), autocast_adapter_dtype=False)
    else:
        library = importlib.import_module("slimtune_before") if kind == "before" else slimtune
        model = library.get_peft_model(model, library.LoraConfig(r=rank, lora_alpha=2 * rank,
                                                                 target_modules=TARGETS, use_dora=dora))
        if kind == "alone":
            strip_siblings(model)
        if kind == "stripped":
            strip_lean(model, LLAMA_LEAN)
    if compiled:
        library = importlib.import_module("slimtune_before") if kind == "before" else slimtune
        importlib.import_module(f"{library.__name__}.models.layers").compile_layers(model)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:  # B away from zero
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.01)
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))

    def step() -> torch.Tensor:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


#: ATen ops that only make views or read metadata: no kernel on a GPU
_NO_KERNEL = {"t", "view", "_unsafe_view", "reshape", "slice", "select", "expand", "transpose", "permute", "split",
              "split_with_sizes", "unbind", "chunk", "detach", "alias", "as_strided", "squeeze", "unsqueeze",
              "empty", "new_empty", "empty_strided", "lift_fresh"}


class KernelCount(TorchDispatchMode):
    """Counts the ATen calls that launch a kernel on a GPU (every call but views and allocations), by op name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func.__name__.split(".")[0]
        if name not in _NO_KERNEL:
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def kernels_per_step(step: Callable[[], torch.Tensor]) -> int:
    """The kernels one training step would launch on a GPU (:class:`KernelCount`); the CPU proxy's companion."""
    with KernelCount() as count:
        step()
    return sum(count.ops.values())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=["lora", "dora"], default="lora")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--before", default=None, metavar="DIR",
                        help="a directory holding an earlier copy of the package as slimtune_before")
    parser.add_argument("--compile", action="store_true",
                        help="every decoder layer through compile_layers on every side (Inductor's CPU code: its "
                             "kernels are C++ loops, not launches, so only the wrapper's host work carries over)")
    parser.add_argument("--stripped", action="store_true",
                        help="also slimtune without its lean RMSNorm and SwiGLU (LLAMA_LEAN), as ``stripped``")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(environment_line(), flush=True)
    kinds = (*KINDS, "stripped") if args.stripped else KINDS
    if args.before:
        sys.path.insert(0, args.before)
        kinds = (*kinds, "before")
    steps = {kind: build_step(kind, args.method, args.layers, args.rank, args.compile) for kind in kinds}
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for index in range(args.warmup + args.rounds):
        shift = index % len(kinds)
        for kind in kinds[shift:] + kinds[:shift]:
            t0 = time.perf_counter()
            steps[kind]()
            if index >= args.warmup:
                times[kind].append(time.perf_counter() - t0)
    def paired(kind: str, base: str) -> str:
        return f"{statistics.median(t / b for t, b in zip(times[kind], times[base])):.3f}"

    rows = []
    for kind in kinds:
        rows.append([kind, f"{statistics.median(times[kind]) * 1e3:.2f}", paired(kind, "peft-bf16"),
                     paired(kind, "alone"), *((paired(kind, "before"),) if args.before else ()),
                     "—" if args.compile else str(kernels_per_step(steps[kind]))])
    text = (f"{args.method}{', compiled' if args.compile else ''}, {args.layers} layers of hidden 32, r={args.rank}, batch 2 x 8 tokens, fp32, one CPU "
            f"thread; {args.rounds} rotating rounds after {args.warmup}\n\n"
            + markdown_table(["build", "median ms", "÷ peft-bf16 (paired)", "÷ alone (paired)",
                              *(("÷ before (paired)",) if args.before else ()), "kernels per step (GPU launches)"],
                             rows))
    print(text)
    write_out_text(f"host_proxy_{args.method}.md", environment_line() + "\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
