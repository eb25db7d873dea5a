"""The optional libraries (transformers and diffusers for the presets, matplotlib for plots), each behind a clear
error naming how to install it."""
from __future__ import annotations

from typing import Any

from ..errors import MissingDependencyError


def require_transformers() -> Any:
    """The ``transformers`` module, or :class:`~slimtune.errors.MissingDependencyError` saying how to install it."""
    try:
        import transformers
    except ImportError as exc:
        raise MissingDependencyError(
            f"model presets need transformers ({exc}); install it with: pip install 'slimtune[hf]'") from None
    return transformers


def require_diffusers() -> Any:
    """The ``diffusers`` module, or :class:`~slimtune.errors.MissingDependencyError` saying how to install it."""
    try:
        import diffusers
    except ImportError as exc:
        raise MissingDependencyError(f"diffusion presets need diffusers ({exc}); install it with: "
                                     "pip install 'slimtune[diffusion]'") from None
    return diffusers


def require_pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or :class:`~slimtune.errors.MissingDependencyError`
    saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError("plots need matplotlib; install it with: pip install 'slimtune[plot]' "
                                     "(or pip install matplotlib)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt
