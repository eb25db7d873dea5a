"""A kohya file written here loads with diffusers' own ``load_lora_weights`` (a tiny StableDiffusionPipeline and
FluxPipeline built from their parts) and gives the outputs slimtune gives.

diffusers 0.42 reads LoRA / LoCon from kohya files (SD: every UNet layer; Flux, prefix ``lora_transformer``: the
attention projections only); it drops DoRA's ``dora_scale`` with a warning and reads no LoHa / LoKr for these
pipelines, so those cross through LyCORIS and PEFT instead (test_lycoris.py, test_kohya.py)."""
from __future__ import annotations

import pytest

import slimtune
from slimtune import LoraConfig, interop
from tests.helpers import rel_err
from tests.interop.denoisers import DIT, UNET, denoiser, diffusers, perturbed, run

pytest.importorskip("peft")  # diffusers' LoRA loading runs on PEFT
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def test_stable_diffusion_pipeline_loads_locon(tmp_path):
    model = denoiser(UNET)
    config = LoraConfig(r=4, alpha=6, target_modules=interop.targets(model, "all"), rank_pattern={"conv2": 2})
    ours = perturbed(slimtune.adapt(model, config))
    interop.save_kohya(ours, tmp_path / "locon.safetensors")
    pipe = diffusers.StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=denoiser(UNET),
                                             scheduler=diffusers.DDIMScheduler(), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(tmp_path / "locon.safetensors"))
    assert rel_err(run(pipe.unet, UNET), run(ours, UNET)) < 1e-5


def test_flux_pipeline_loads_attention_lora(tmp_path):
    attention = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    ours = perturbed(slimtune.adapt(denoiser(DIT), LoraConfig(r=4, alpha=8, target_modules=attention)))
    interop.save_kohya(ours, tmp_path / "lora.safetensors", prefix="lora_transformer")
    pipe = diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                                  tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=denoiser(DIT))
    pipe.load_lora_weights(str(tmp_path / "lora.safetensors"))
    assert rel_err(run(pipe.transformer, DIT), run(ours, DIT)) < 1e-5
