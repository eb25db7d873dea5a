"""Target presets: on a UNet "attn" / "attn+conv" select what slimtune.models.diffusion's suffix lists select, "all"
adds LyCORIS' model-level layers; on a Flux DiT the blocks' attention and MLP Linears, modulation only in "all"."""
from __future__ import annotations

import pytest
import torch

from slimtune import TargetError
from slimtune.core.config import name_matches
from slimtune.core.targeting import is_adaptable
from slimtune.interop import targets
from slimtune.models import build_model
from slimtune.models.diffusion import (DIFFUSION_PRESETS, FLUX_TARGETS, UNET_ATTENTION_TARGETS, UNET_CONV_TARGETS,
                                       build_parts)
from tests.toy_models import mlp

pytest.importorskip("diffusers")


def _denoiser(preset: str) -> torch.nn.Module:
    with torch.device("meta"):
        return build_parts(DIFFUSION_PRESETS[preset], text_encoders=False).denoiser


def _matched(model: torch.nn.Module, suffixes) -> set[str]:
    return {n for n, m in model.named_modules() if n and is_adaptable(m) and name_matches(list(suffixes), n)}


@pytest.mark.parametrize("preset", ["stable-diffusion-1.5", "tiny-unet"])
def test_unet_presets(preset):
    unet = _denoiser(preset)
    attn, attn_conv, everything = (set(targets(unet, p)) for p in ("attn", "attn+conv", "all"))
    assert attn == _matched(unet, UNET_ATTENTION_TARGETS)
    assert attn_conv == _matched(unet, UNET_ATTENTION_TARGETS + UNET_CONV_TARGETS)
    assert everything - attn_conv == {"conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"}


def test_dit_presets():
    dit = _denoiser("tiny-dit-4b")
    attn = targets(dit, "attn")
    assert set(attn) == _matched(dit, FLUX_TARGETS) - {"proj_out"}  # the final layer is no block's
    assert targets(dit, "attn+conv") == attn
    assert set(targets(dit, "all")) - set(attn) == {"transformer_blocks.0.norm1.linear",
                                                    "transformer_blocks.0.norm1_context.linear",
                                                    *(f"single_transformer_blocks.{i}.norm.linear" for i in range(3))}


def test_presets_on_a_wrapper_and_refusals():
    model = build_model("tiny-unet", "cpu", "float32")  # DiffusionModel: UNet + text encoder
    assert targets(model, "attn") == ["unet." + n for n in targets(model.unet, "attn")]
    with pytest.raises(TargetError, match="unknown target preset 'conv'"):
        targets(model, "conv")
    with pytest.raises(TargetError, match="no diffusers UNet blocks"):
        targets(mlp(), "attn")
