"""kohya / LyCORIS module names: ``<prefix>_<module path with "." written "_">``, both ways.

kohya's trainers (sd-scripts) and LyCORIS name each adapted layer of the denoiser ``lora_unet_`` + its diffusers
module path with every ``.`` replaced by ``_``, e.g. ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``
-> ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``; text encoders get ``lora_te_``
(``lora_te1_`` / ``lora_te2_`` for SDXL's two), LyCORIS' own wrapper ``lycoris_``, and diffusers reads Flux files
with ``lora_transformer_``. Encoding is exact; decoding is not (``to_q`` and ``to.q`` encode alike), so:

* with the model at hand (:func:`module_index`), a name is looked up among the model's own encoded names — what
  LyCORIS does when it loads a file;
* without it (:func:`decode_path`), the name is split into the components of diffusers' UNet2DConditionModel and
  FluxTransformer2DModel module paths (:data:`DIFFUSERS_ATOMS`, :data:`DIFFUSERS_WORDS`), longest first; a
  component outside that vocabulary is an error that asks for the model, never a guess.
"""
from __future__ import annotations

from typing import Iterable

from ..errors import CheckpointError

#: Prefixes of the denoiser's modules (kohya / LyCORIS-kohya, diffusers' Flux reader, LyCORIS' own wrapper).
DENOISER_PREFIXES: tuple[str, ...] = ("lora_unet", "lora_transformer", "lycoris")
#: Prefixes of text-encoder modules (SD: ``lora_te``; SDXL: ``lora_te1`` / ``lora_te2``; SD3: ``lora_te3``).
TEXT_ENCODER_PREFIXES: tuple[str, ...] = ("lora_te", "lora_te1", "lora_te2", "lora_te3")
DEFAULT_PREFIX = "lora_unet"

#: Module-path components of diffusers' UNets and Flux DiTs that contain ``_`` (SD-1.5, SDXL, FLUX.1).
DIFFUSERS_ATOMS: frozenset[str] = frozenset({
    "act_1", "act_mlp", "add_embedding", "add_k_proj", "add_q_proj", "add_time_proj", "add_v_proj",
    "context_embedder", "conv_act", "conv_in", "conv_norm_out", "conv_out", "conv_shortcut", "down_blocks",
    "ff_context", "guidance_embedder", "linear_1", "linear_2", "mid_block", "norm1_context", "norm2_context",
    "norm_added_k", "norm_added_q", "norm_k", "norm_out", "norm_q", "pos_embed", "proj_in", "proj_mlp", "proj_out",
    "single_transformer_blocks", "text_embedder", "time_emb_proj", "time_embedding", "time_proj", "time_text_embed",
    "timestep_embedder", "to_add_out", "to_k", "to_out", "to_q", "to_v", "transformer_blocks", "up_blocks",
    "x_embedder",
})
#: Their components without ``_`` (numbers are components too).
DIFFUSERS_WORDS: frozenset[str] = frozenset({
    "act", "attentions", "attn", "attn1", "attn2", "conv", "conv1", "conv2", "downsamplers", "dropout", "ff",
    "linear", "net", "nonlinearity", "norm", "norm1", "norm2", "norm3", "proj", "resnets", "silu", "upsamplers",
})
_ATOM_TOKENS: tuple[tuple[str, ...], ...] = tuple(sorted((tuple(a.split("_")) for a in DIFFUSERS_ATOMS),
                                                         key=len, reverse=True))


def kohya_name(path: str, prefix: str = DEFAULT_PREFIX) -> str:
    """``prefix`` + ``_`` + the module path with ``.`` written ``_``."""
    return f"{prefix}_{path}".replace(".", "_")


def split_prefix(name: str) -> tuple[str, str]:
    """``(prefix, rest)`` of a kohya module name; the longest known prefix wins (``lora_te1`` over ``lora_te``)."""
    for prefix in sorted(DENOISER_PREFIXES + TEXT_ENCODER_PREFIXES, key=len, reverse=True):
        if name.startswith(prefix + "_"):
            return prefix, name[len(prefix) + 1:]
    known = ", ".join(f"{p}_" for p in DENOISER_PREFIXES + TEXT_ENCODER_PREFIXES)
    raise CheckpointError(f"kohya module name {name!r} has no known prefix ({known})")


def is_text_encoder(prefix: str) -> bool:
    return prefix in TEXT_ENCODER_PREFIXES


def module_index(paths: Iterable[str]) -> dict[str, str]:
    """``{encoded path (no prefix): module path}`` for the modules of a model (as LyCORIS matches them)."""
    return {path.replace(".", "_"): path for path in paths if path}


def decode_path(rest: str, index: dict[str, str] | None = None) -> str:
    """The diffusers module path a kohya name (without its prefix) stands for.

    ``index`` (:func:`module_index` of the model) decides exactly; without it the vocabulary of diffusers' UNet
    and Flux module names does, and a component outside it raises :class:`CheckpointError`.
    """
    if index is not None:
        if rest not in index:
            raise CheckpointError(f"kohya module {rest!r} names no module of the model")
        return index[rest]
    tokens = rest.split("_")
    parts: list[str] = []
    i = 0
    while i < len(tokens):
        atom = next((a for a in _ATOM_TOKENS if tuple(tokens[i:i + len(a)]) == a), None)
        if atom is not None:
            parts.append("_".join(atom))
            i += len(atom)
            continue
        token = tokens[i]
        if not (token.isdigit() or token in DIFFUSERS_WORDS):
            hint = (" (kohya's SDXL files name the original SGM UNet's blocks, input_blocks/output_blocks: "
                    "load them into the model, or convert them with diffusers first)" if token in
                    ("input", "output", "middle") else "")
            raise CheckpointError(
                f"cannot tell which module kohya name {rest!r} stands for: {token!r} is not part of a diffusers "
                f"UNet or Flux module name{hint}; give the base model (load_kohya(model, ...), or "
                "`slimtune convert --base PRESET`)")
        parts.append(token)
        i += 1
    return ".".join(parts)
