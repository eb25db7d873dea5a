"""Does this torch give an ``autograd.Function`` its gradient under ``torch.compile`` when the forward returns the very
tensor object of one of its intermediates? Torch 2.11 does not (all-zero gradients; 2.13 does): why DoRA's Functions
return a copy while traced (:func:`slimtune.core.tracing.distinct_when_traced`). No slimtune code runs here::

    python benchmarks/function_output_alias.py        # one line per form: eager and compiled gradient norms
"""
from __future__ import annotations

import torch


class Scaled(torch.autograd.Function):
    """``y = 3·(x Wᵀ)``, returned in one of the forms below; backward as it should be."""

    @staticmethod
    def forward(ctx, x, w, form: str):
        y = (x @ w.t()) * 3.0
        if form == "same dtype .to":  # returns y itself
            y = y.to(y.dtype)
        elif form == "in place":
            y.add_(1.0)
        elif form == "copy of in place":
            y = y.add_(1.0).clone()
        ctx.save_for_backward(x, w)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dz = dy * 3.0
        return dz @ w, dz.t() @ x, None


def gradient_norms(form: str, compiled: bool) -> tuple[float, float]:
    torch.manual_seed(0)
    x, w = torch.randn(5, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    fn = (lambda a, b: Scaled.apply(a, b, form))
    if compiled:
        torch.compiler.reset()
        fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    (fn(x, w) * torch.arange(6.0)).sum().backward()
    return float(x.grad.norm()), float(w.grad.norm())


def main() -> None:
    print(f"torch {torch.__version__}")
    for form in ("new tensor", "same dtype .to", "in place", "copy of in place"):
        eager, compiled = gradient_norms(form, False), gradient_norms(form, True)
        verdict = "ok" if all(abs(a - b) <= 1e-4 * a for a, b in zip(eager, compiled)) else "WRONG"
        print(f"{form:18s} eager {eager[0]:9.3f} {eager[1]:9.3f}   compiled {compiled[0]:9.3f} {compiled[1]:9.3f}   "
              f"{verdict}")


if __name__ == "__main__":
    main()
