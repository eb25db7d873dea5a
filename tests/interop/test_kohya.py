"""kohya / LyCORIS files on a tiny diffusers UNet and DiT: every method written and read back to identical outputs,
kohya -> PEFT -> kohya bit for bit (also for a foreign file's alpha quirks), PEFT reading the converted directory,
and the refusals."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import slimtune
from slimtune import CheckpointError, HraConfig, LohaConfig, LokrConfig, LoraConfig, interop
from slimtune.models import build_model
from tests.helpers import rel_err
from tests.interop.denoisers import DIT, UNET, denoiser, perturbed, run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

# (model, config factory given the model's "attn+conv" targets)
CASES = {
    "unet-locon-patterns": (UNET, lambda t: LoraConfig(r=4, alpha=6, target_modules=t, rank_pattern={"conv1": 2},
                                                       alpha_pattern={"to_q": 3})),
    "unet-dora": (UNET, lambda t: LoraConfig(r=3, alpha=5, target_modules=["to_k", "proj_out", "conv2",
                                                                          "conv_shortcut"], use_dora=True)),
    "unet-loha-tucker": (UNET, lambda t: LohaConfig(r=2, alpha=3, target_modules=t, use_effective_conv2d=True)),
    "unet-lokr-both-tucker": (UNET, lambda t: LokrConfig(r=2, alpha=3, target_modules=t, decompose_both=True,
                                                         use_effective_conv2d=True)),
    "unet-lokr-full-scaled": (UNET, lambda t: LokrConfig(r=64, alpha=3, target_modules=t)),  # full x full, s != 1
    "dit-lora": (DIT, lambda t: LoraConfig(r=4, alpha=8, target_modules=t)),
    "dit-loha": (DIT, lambda t: LohaConfig(r=3, alpha=2, target_modules=t)),
    "dit-lokr": (DIT, lambda t: LokrConfig(r=2, alpha=4, target_modules=t, decompose_factor=4)),
}


def adapted(case: str) -> torch.nn.Module:
    kind, make = CASES[case]
    model = denoiser(kind)
    return perturbed(slimtune.adapt(model, make(interop.targets(model, "attn+conv"))))


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("case", CASES)
def test_written_file_loads_back_and_round_trips_through_peft(case, tmp_path):
    kind = CASES[case][0]
    ours = adapted(case)
    want = run(ours, kind)
    interop.save_kohya(ours, tmp_path / "a.safetensors")
    loaded = interop.load_kohya(denoiser(kind), tmp_path / "a.safetensors")
    got = run(loaded, kind)
    # a full x full LoKr layer's PEFT scale is folded into lokr_w1 (LyCORIS scales such layers by 1)
    assert torch.equal(got, want) if case != "unet-lokr-full-scaled" else rel_err(got, want) < 1e-6
    assert type(loaded.slimtune_config) is type(ours.slimtune_config)

    interop.convert(tmp_path / "a.safetensors", tmp_path / "peft", "peft")
    interop.convert(tmp_path / "peft", tmp_path / "b.safetensors", "kohya")
    assert same_tensors(load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors"))


@pytest.mark.parametrize("case", ["unet-dora", "unet-loha-tucker", "dit-lokr"])
def test_peft_reads_the_converted_directory(case, tmp_path):
    """The directory a kohya file converts to means the same to PEFT (and to slimtune.load_adapter)."""
    peft = pytest.importorskip("peft")
    kind = CASES[case][0]
    ours = adapted(case)
    interop.save_kohya(ours, tmp_path / "a.safetensors")
    interop.convert(tmp_path / "a.safetensors", tmp_path / "peft", "peft")
    theirs = peft.PeftModel.from_pretrained(denoiser(kind), tmp_path / "peft").eval()
    want = run(ours, kind)
    assert rel_err(run(theirs, kind), want) < 1e-5
    assert torch.equal(run(slimtune.load_adapter(denoiser(kind), tmp_path / "peft"), kind), want)


def test_a_foreign_files_alphas_round_trip_and_read_as_kohya_means_them(tmp_path):
    """No alpha (= r), alpha 0 (= r), a bf16 alpha beside fp32 weights, LoKr's ignored alpha: kept bit for bit."""
    ours = perturbed(slimtune.adapt(denoiser(UNET), LoraConfig(r=4, alpha=8, target_modules=["to_q", "to_k",
                                                                                               "to_v"])))
    interop.save_kohya(ours, tmp_path / "a.safetensors")
    state = load_file(tmp_path / "a.safetensors")
    q, k, v = (f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_{x}" for x in "qkv")
    del state[f"{q}.alpha"]
    state[f"{k}.alpha"] = torch.tensor(0.0)
    state[f"{v}.alpha"] = torch.tensor(2.0, dtype=torch.bfloat16)
    save_file(state, tmp_path / "b.safetensors", metadata={"ss_network_dim": "4", "ss_output_name": "mine"})
    interop.convert(tmp_path / "b.safetensors", tmp_path / "peft", "peft")
    interop.convert(tmp_path / "peft", tmp_path / "c.safetensors", "kohya")
    assert same_tensors(state, load_file(tmp_path / "c.safetensors"))
    assert interop.read_safetensors(tmp_path / "c.safetensors")[1] == {"ss_network_dim": "4", "ss_output_name": "mine"}
    loaded = dict(slimtune.adapter_modules(interop.load_kohya(denoiser(UNET), tmp_path / "b.safetensors")))
    block = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    assert [loaded[f"{block}.to_{x}"].scaling for x in "qkv"] == [1.0, 1.0, 0.5]
    assert loaded["up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q"].scaling == 2.0


def test_lokr_full_factors_are_scaled_by_one_whatever_their_alpha(tmp_path):
    ours = perturbed(slimtune.adapt(denoiser(UNET), LokrConfig(r=64, alpha=64, target_modules=["to_k"])))
    interop.save_kohya(ours, tmp_path / "a.safetensors")
    state = load_file(tmp_path / "a.safetensors")
    assert not any(k.endswith("lokr_w2_a") for k in state)  # both factors full
    state = {k: torch.tensor(5.0) if k.endswith(".alpha") else v for k, v in state.items()}
    save_file(state, tmp_path / "b.safetensors")
    loaded = interop.load_kohya(denoiser(UNET), tmp_path / "b.safetensors")
    assert all(a.scaling == 1.0 for _, a in slimtune.adapter_modules(loaded))
    assert torch.equal(run(loaded, UNET), run(ours, UNET))
    interop.convert(tmp_path / "b.safetensors", tmp_path / "peft", "peft")
    interop.convert(tmp_path / "peft", tmp_path / "c.safetensors", "kohya")
    assert same_tensors(state, load_file(tmp_path / "c.safetensors"))


def test_dtype_prefix_and_a_diffusion_model_wrapper(tmp_path):
    model = build_model("tiny-unet", "cpu", "float32", seed=0)  # DiffusionModel: the UNet is model.unet
    slimtune.adapt(model, LoraConfig(r=2, target_modules=interop.targets(model, "attn")))
    perturbed(model)
    interop.save_kohya(model, tmp_path / "a.safetensors", prefix="lycoris", dtype=torch.bfloat16)
    state = load_file(tmp_path / "a.safetensors")
    assert all(k.startswith("lycoris_") and not k.startswith("lycoris_unet_") for k in state)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    back = interop.load_kohya(build_model("tiny-unet", "cpu", "float32", seed=0), tmp_path / "a.safetensors")
    assert all(name.startswith("unet.") for name, _ in slimtune.adapter_modules(back))
    bare = interop.load_kohya(denoiser(UNET), tmp_path / "a.safetensors")
    assert len(slimtune.adapter_modules(bare)) == len(slimtune.adapter_modules(model))


def test_refusals(tmp_path):
    with pytest.raises(CheckpointError, match="HraConfig adapters have no kohya"):
        interop.save_kohya(slimtune.adapt(denoiser(UNET), HraConfig(r=2, target_modules=["to_q"])),
                           tmp_path / "h.safetensors")
    ours = perturbed(slimtune.adapt(denoiser(UNET), LoraConfig(r=2, target_modules=["to_q"])))
    interop.save_kohya(ours, tmp_path / "a.safetensors")
    state = load_file(tmp_path / "a.safetensors")
    name = next(iter(state)).split(".")[0]

    def refused(extra: dict, match: str, **kwargs) -> None:
        save_file({**state, **extra}, tmp_path / "x.safetensors")
        with pytest.raises(CheckpointError, match=match):
            interop.load_kohya(denoiser(UNET), tmp_path / "x.safetensors", **kwargs)

    te = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 8),
          "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(8, 2)}
    refused(te, "text-encoder module")
    save_file({**state, **te}, tmp_path / "te.safetensors")
    assert len(slimtune.adapter_modules(interop.load_kohya(denoiser(UNET), tmp_path / "te.safetensors",
                                                           skip_text_encoder=True))) == len(state) // 3
    refused({f"{name}.lora_mid.weight": torch.zeros(2, 2, 3, 3)}, "Tucker core")
    refused({"lora_unet_conv_in.hada_w1_a": torch.zeros(32, 2), "lora_unet_conv_in.hada_w1_b": torch.zeros(2, 36),
             "lora_unet_conv_in.hada_w2_a": torch.zeros(32, 2), "lora_unet_conv_in.hada_w2_b": torch.zeros(2, 36)},
            "mixes methods")
    refused({"lora_unet_down_blocks_9_foo.lora_down.weight": torch.zeros(2, 8),
             "lora_unet_down_blocks_9_foo.lora_up.weight": torch.zeros(8, 2)}, "names no module of the model")
    refused({f"{name}.oft_blocks": torch.zeros(2, 2)}, "OFT")
    refused({f"{name}.lora_down.weight": torch.zeros(2, 16)}, "shape mismatch")
    unknown = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(8, 2)}
    save_file(unknown, tmp_path / "u.safetensors")
    with pytest.raises(CheckpointError, match="'double' is not part of a diffusers"):
        interop.convert(tmp_path / "u.safetensors", tmp_path / "peft", "peft")
    assert not (tmp_path / "peft").exists()
