"""kohya module names: every adaptable layer of SD-1.5, SDXL and FLUX.1 (built on the meta device) decodes back from
its kohya name without the model; what cannot be decoded is an error, never a guess."""
from __future__ import annotations

import pytest
import torch

from slimtune import CheckpointError
from slimtune.core.targeting import is_adaptable
from slimtune.interop import decode_path, kohya_name
from slimtune.interop.names import module_index, split_prefix
from slimtune.models.diffusion import DIFFUSION_PRESETS, build_parts

pytest.importorskip("diffusers")


@pytest.mark.parametrize("preset", ["stable-diffusion-1.5", "sdxl", "flux-dit"])
def test_every_diffusers_layer_name_decodes_back(preset):
    with torch.device("meta"):
        denoiser = build_parts(DIFFUSION_PRESETS[preset], text_encoders=False).denoiser
    names = [name for name, module in denoiser.named_modules() if name and is_adaptable(module)]
    assert len(names) > 100
    for name in names:
        prefix, rest = split_prefix(kohya_name(name))
        assert prefix == "lora_unet" and decode_path(rest) == name


def test_names_are_kohyas():
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert kohya_name(path) == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert kohya_name("single_transformer_blocks.3.proj_mlp", "lora_transformer") == \
        "lora_transformer_single_transformer_blocks_3_proj_mlp"
    assert split_prefix("lora_te2_text_model_encoder_layers_0_mlp_fc1") == ("lora_te2",
                                                                            "text_model_encoder_layers_0_mlp_fc1")
    # with the model, names decode by lookup (any architecture)
    assert decode_path("blocks_0_img_attn", module_index(["blocks", "blocks.0", "blocks.0.img_attn"])) == \
        "blocks.0.img_attn"


@pytest.mark.parametrize("name, match", [
    ("lora_unet_input_blocks_4_1_proj_in", "SGM UNet"),
    ("lora_unet_double_blocks_0_img_attn_qkv", "'double' is not part of a diffusers"),
    ("lora_foo_bar", "no known prefix"),
])
def test_undecodable_names_are_refused(name, match):
    with pytest.raises(CheckpointError, match=match):
        decode_path(split_prefix(name)[1])
