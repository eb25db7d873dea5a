"""Target presets for diffusers denoisers, chosen by module class as LyCORIS chooses them.

``targets(model, preset)`` lists the qualified names of the layers a preset adapts; pass it as ``target_modules``.

=============  =====================================================  ============================================
preset         diffusers UNet (SD-1.x, SDXL)                          Flux / SD3 DiT
=============  =====================================================  ============================================
``attn``       every Linear / 1x1 Conv in the ``Transformer2DModel``  the attention, context and MLP Linears of the
               blocks: attention q/k/v/out, ``proj_in``/``proj_out``,  transformer blocks (not the AdaLN modulation
               feed-forward (LyCORIS ``attn-mlp``)                    Linears inside their norms)
``attn+conv``  + the ``ResnetBlock2D`` / ``Downsample2D`` /           as ``attn`` (a DiT has no convolutions)
               ``Upsample2D`` layers: conv1/conv2/conv_shortcut,
               ``time_emb_proj``, the resamplers' convs (LoCon /
               LoHa / LoKr's usual set)
``all``        + ``conv_in``, ``conv_out``, ``time_embedding``'s two   every Linear of the transformer blocks,
               Linears (LyCORIS' default preset, ``full``)            modulation included (LyCORIS ``full``)
=============  =====================================================  ============================================

On SD-1.5 ``attn`` and ``attn+conv`` select exactly what :data:`slimtune.models.diffusion.UNET_ATTENTION_TARGETS`
and ``UNET_ATTENTION_TARGETS + UNET_CONV_TARGETS`` select (tested), and on Flux ``attn`` what ``FLUX_TARGETS``
selects in the blocks.
"""
from __future__ import annotations

from torch import nn

from ..core.targeting import is_adaptable
from ..errors import TargetError

TARGET_PRESETS: tuple[str, ...] = ("attn", "attn+conv", "all")
#: Block classes whose layers each preset adapts, per architecture (diffusers class names).
UNET_ATTENTION_BLOCKS = ("Transformer2DModel",)
UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
#: Model-level layers LyCORIS' ``full`` preset adds on a UNet.
UNET_EXTRA_NAMES = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")
DIT_BLOCKS = ("FluxTransformerBlock", "FluxSingleTransformerBlock", "JointTransformerBlock")


def architecture(model: nn.Module) -> str:
    """``"unet"`` or ``"dit"`` from the block classes ``model`` holds (:class:`TargetError` for neither)."""
    classes = {type(m).__name__ for m in model.modules()}
    if classes & set(UNET_ATTENTION_BLOCKS + UNET_CONV_BLOCKS):
        return "unet"
    if classes & set(DIT_BLOCKS):
        return "dit"
    raise TargetError(f"{type(model).__name__} holds no diffusers UNet blocks ({', '.join(UNET_ATTENTION_BLOCKS)}, "
                      f"{', '.join(UNET_CONV_BLOCKS)}) and no DiT blocks ({', '.join(DIT_BLOCKS)}): no target preset "
                      "applies; list target_modules yourself")


def _layers_in(model: nn.Module, block_classes: tuple[str, ...], skip_norms: bool = False) -> list[str]:
    """Adaptable layers inside blocks of ``block_classes`` (``skip_norms``: not inside a ``*Norm*`` module)."""
    found: list[str] = []
    for block_name, block in model.named_modules():
        if type(block).__name__ not in block_classes:
            continue
        norms = [n for n, m in block.named_modules() if n and "Norm" in type(m).__name__] if skip_norms else []
        for name, layer in block.named_modules():
            if name and is_adaptable(layer) and not any(name.startswith(n + ".") for n in norms):
                found.append(f"{block_name}.{name}" if block_name else name)
    return found


def targets(model: nn.Module, preset: str) -> list[str]:
    """The qualified names of the layers ``preset`` (``"attn"``, ``"attn+conv"``, ``"all"``) adapts in ``model``
    (a diffusers UNet or Flux/SD3 DiT, or a model holding one), in ``named_modules`` order."""
    if preset not in TARGET_PRESETS:
        raise TargetError(f"unknown target preset {preset!r}; choose from {', '.join(TARGET_PRESETS)}")
    if architecture(model) == "dit":
        chosen = set(_layers_in(model, DIT_BLOCKS, skip_norms=preset != "all"))
    else:
        chosen = set(_layers_in(model, UNET_ATTENTION_BLOCKS))
        if preset != "attn":
            chosen |= set(_layers_in(model, UNET_CONV_BLOCKS))
        if preset == "all":
            chosen |= {name for name, m in model.named_modules() if is_adaptable(m) and
                       any(name == n or name.endswith("." + n) for n in UNET_EXTRA_NAMES)}
    return [name for name, _ in model.named_modules() if name in chosen]
