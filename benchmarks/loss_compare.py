"""The causal-LM loss's cost at a model's output head: forward and backward (to the hidden states; the head frozen,
as in adapter training) of transformers' path (bf16 logits, their float32 copy, ``F.cross_entropy``), slimtune's
chunked loss with its plain-PyTorch chunk (``softmax_cross_entropy_reference``) and with its Triton kernel (one
launch per chunk). Interleaved rounds, CUDA-event times, each form's peak above its inputs, and the loss and
gradient against the float64 loss (CUDA only)::

    python benchmarks/loss_compare.py                       # Llama-3.2-3B's head: 2,047 rows, 3,072 wide, 128,256
    python benchmarks/loss_compare.py --rows 8191 --rounds 10
"""
from __future__ import annotations

import argparse
import statistics
from typing import Callable

from _common import environment_line, markdown_table, write_out_text

import torch
import torch.nn.functional as F

from slimtune.memory.chunked_loss import LinearCrossEntropy, chunk_rows


def transformers_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` on already shifted rows: bf16 logits, upcast, summed cross entropy."""
    return F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="sum")


def chunked(kernel: bool) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    def loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return LinearCrossEntropy.apply(hidden, weight, None, labels, chunk_rows(weight.shape[0]), False, kernel)
    return loss


FORMS = {"transformers": transformers_loss, "chunked, reference": chunked(False), "chunked, kernel": chunked(True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4 * 511)
    parser.add_argument("--hidden", type=int, default=3072)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = (torch.randn(args.rows, args.hidden, device="cuda") * 2).bfloat16()
    weight = (torch.randn(args.vocab, args.hidden, device="cuda") / args.hidden ** 0.5 * 3).bfloat16()
    labels = torch.randint(0, args.vocab, (args.rows,), device="cuda")
    h64 = base.double().requires_grad_()
    ref = F.cross_entropy(F.linear(h64, weight.double()), labels, reduction="sum")
    ref.backward()
    times: dict[str, list[float]] = {name: [] for name in FORMS}
    peaks, errors = {}, {}
    for round_ in range(args.rounds + 2):  # two warm-up rounds
        for name, form in FORMS.items():
            hidden = base.clone().requires_grad_()
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = form(hidden, weight, labels)
            loss.backward()
            end.record()
            torch.cuda.synchronize()
            if round_ >= 2:
                times[name].append(start.elapsed_time(end))
            peaks[name] = (torch.cuda.max_memory_allocated() - before) / 2**30
            errors[name] = (abs(loss.item() - ref.item()) / abs(ref.item()),
                            ((hidden.grad.double() - h64.grad).norm() / h64.grad.norm()).item())
    base_ms = statistics.median(times["transformers"])
    rows = [[name, f"{statistics.median(t):.3f}", f"{statistics.median(t) / base_ms:.3f}", f"{peaks[name]:.2f}",
             f"{errors[name][0]:.1e}", f"{errors[name][1]:.1e}"] for name, t in times.items()]
    text = (f"{environment_line()}\n\n{args.rows} rows, hidden {args.hidden}, vocabulary {args.vocab}, bf16, frozen "
            f"head; forward and backward to the hidden states, {args.rounds} interleaved rounds\n\n"
            + markdown_table(["form", "median ms", "÷ transformers", "peak GiB", "loss rel. err.",
                              "d hidden rel. err."], rows))
    print(text)
    write_out_text("loss_compare.md", text)


if __name__ == "__main__":
    main()
