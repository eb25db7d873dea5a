"""Which kohya / LyCORIS tensor is which PEFT tensor, per method, and the one reshape between them.

Per adapted module a kohya file holds ``<kohya module name>.<suffix>`` tensors and a scalar ``.alpha``:

* LoRA / LoCon: ``lora_down.weight`` ``[r, d_in(, *k)]`` = PEFT's ``lora_A.weight``, ``lora_up.weight``
  ``[d_out, r(, 1, 1)]`` = ``lora_B.weight``; DoRA (LyCORIS ``dora_wd``, per output row) adds ``dora_scale``
  ``[d_out, 1(, 1, 1)]`` = PEFT's ``lora_magnitude_vector`` (``[d_out]`` on a Linear, ``[1, d_out, 1, 1]`` on a
  Conv2d: same numbers, other shape);
* LoHa: ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` (and Tucker ``hada_t1``, ``hada_t2``) — the
  same names and shapes in PEFT (PEFT's LoHa was ported from LyCORIS);
* LoKr: ``lokr_w1`` or ``lokr_w1_a``/``lokr_w1_b``; ``lokr_w2``, or ``lokr_w2_a``/``lokr_w2_b`` (and Tucker
  ``lokr_t2``) — the same in PEFT.

What PEFT cannot hold is refused by name (:func:`check_suffixes`): LoCon's Tucker ``lora_mid``, DoRA on LoHa /
LoKr, DoRA per input column, and LyCORIS' other algorithms (full, IA³, (B)OFT, GLoRA, norms).
"""
from __future__ import annotations

import dataclasses

import torch

from ..errors import CheckpointError

ALPHA = "alpha"
DORA_SCALE = "dora_scale"
MAGNITUDE = "lora_magnitude_vector"


@dataclasses.dataclass(frozen=True)
class Layout:
    """One method's tensors: ``keys`` maps kohya suffix -> PEFT suffix; ``markers`` are the suffixes that tell the
    method from a module's keys (one of them is always there)."""

    method: str  # "lora" (LoCon, DoRA too), "loha", "lokr"
    peft_type: str
    keys: dict[str, str]
    markers: tuple[str, ...]

    @property
    def peft_keys(self) -> dict[str, str]:
        """PEFT suffix -> kohya suffix."""
        return {peft: kohya for kohya, peft in self.keys.items()}


LORA = Layout("lora", "LORA", {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight",
                               DORA_SCALE: MAGNITUDE}, ("lora_down.weight",))
LOHA = Layout("loha", "LOHA", {k: k for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1",
                                             "hada_t2")}, ("hada_w1_a",))
LOKR = Layout("lokr", "LOKR", {k: k for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a",
                                             "lokr_w2_b", "lokr_t2")}, ("lokr_w1", "lokr_w1_a"))
LAYOUTS: tuple[Layout, ...] = (LORA, LOHA, LOKR)

#: kohya / LyCORIS suffixes with no PEFT counterpart, and what they are.
UNSUPPORTED: dict[str, str] = {
    "lora_mid.weight": "LoCon's Tucker core (LyCORIS use_tucker on LoRA; PEFT's LoRA has no such form)",
    "diff": "LyCORIS 'full' (a dense weight difference)", "diff_b": "LyCORIS 'full' (a dense bias difference)",
    "w_norm": "LyCORIS norm training", "b_norm": "LyCORIS norm training",
    "oft_blocks": "LyCORIS (B)OFT", "oft_diag": "LyCORIS diag-OFT", "rescale": "LyCORIS OFT rescaling",
    "a1.weight": "LyCORIS GLoRA", "weight": "LyCORIS IA³", "on_input": "LyCORIS IA³",
}


def layout_of(module: str, suffixes: set[str]) -> Layout:
    """The method of one kohya module from its tensor suffixes."""
    found = [layout for layout in LAYOUTS if any(m in suffixes for m in layout.markers)]
    if len(found) != 1:
        what = sorted(UNSUPPORTED[s] for s in suffixes if s in UNSUPPORTED)
        detail = f" ({'; '.join(what)})" if what else f" (keys: {', '.join(sorted(suffixes))})"
        raise CheckpointError(f"{module}: not a LoRA/LoCon, LoHa or LoKr module{detail}")
    return found[0]


def check_suffixes(module: str, layout: Layout, suffixes: set[str]) -> None:
    """Refuse keys this method's PEFT form cannot hold, naming them."""
    extra = sorted(suffixes - set(layout.keys) - {ALPHA})
    if layout is not LORA and DORA_SCALE in suffixes:
        extra = [DORA_SCALE] + [s for s in extra if s != DORA_SCALE]
    if extra:
        what = "; ".join(f"{s}: {UNSUPPORTED.get(s, 'unknown to slimtune')}" if s != DORA_SCALE else
                         f"{s}: DoRA on {layout.method} (PEFT's LoHa/LoKr have no DoRA)" for s in extra)
        raise CheckpointError(f"{module}: keys PEFT's {layout.peft_type} format cannot hold: {what}")


def magnitude_to_peft(scale: torch.Tensor, down: torch.Tensor, module: str) -> torch.Tensor:
    """LyCORIS ``dora_scale`` ``[d_out, 1, ...]`` -> PEFT's ``lora_magnitude_vector`` (``[d_out]`` for a Linear,
    ``[1, d_out, 1, ...]`` for a convolution: ``down``'s dimensions)."""
    d_out = scale.shape[0]
    if scale.numel() != d_out or scale.dim() != down.dim():
        raise CheckpointError(f"{module}: dora_scale of shape {tuple(scale.shape)} is not one norm per output row "
                              "(LyCORIS wd_on_output=False?): PEFT's DoRA keeps one per output row")
    return scale.reshape(d_out) if down.dim() == 2 else scale.reshape(1, d_out, *(1,) * (down.dim() - 2))


def magnitude_to_kohya(magnitude: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """PEFT's ``lora_magnitude_vector`` -> LyCORIS ``dora_scale`` ``[d_out, 1, ...]`` (``down``'s dimensions)."""
    return magnitude.reshape(magnitude.numel(), *(1,) * (down.dim() - 1))
