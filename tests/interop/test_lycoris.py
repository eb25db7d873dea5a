"""Files cross to LyCORIS (its kohya loader and its own wrapper, on a tiny diffusers UNet) and back, with the same
outputs; a LyCORIS-written file goes kohya -> PEFT -> kohya bit for bit; what PEFT cannot hold is refused."""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

import slimtune
from slimtune import CheckpointError, LohaConfig, LokrConfig, LoraConfig, interop
from tests.helpers import rel_err
from tests.interop.denoisers import UNET, denoiser, perturbed, run

lycoris_kohya = pytest.importorskip("lycoris.kohya", reason="LyCORIS (pip install lycoris-lora) is not installed")
lycoris_wrapper = pytest.importorskip("lycoris.wrapper")
logging.getLogger("LyCORIS").setLevel(logging.ERROR)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture
def kohya_loader(monkeypatch):
    """LyCORIS 4.1.3's kohya loader first builds a network of its default "full" preset, which on a diffusers UNet
    names time_embedding.linear_1 twice (its TimestepEmbedding class and its name list) and fails an assertion
    before reading the file; the name list is emptied for the test (restored after)."""
    monkeypatch.setattr(lycoris_kohya.LycorisNetworkKohya, "UNET_TARGET_REPLACE_NAME", [])

    def load(path, unet):
        network, _ = lycoris_kohya.create_network_from_weights(1.0, str(path), None, None, unet)
        network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
        return len(network.unet_loras)

    return load


def lycoris_load(path, unet) -> int:
    """LyCORIS' own wrapper (prefix ``lycoris_``)."""
    network, _ = lycoris_wrapper.create_lycoris_from_weights(1.0, str(path), unet)
    network.apply_to()
    return len(network.loras)


# LoKr on convolutions crosses only in LyCORIS' own layout (its loader re-derives the factor split from the
# flattened kernel), so LoKr is checked on the attention layers.
CASES = {
    "locon-all": ("lora_unet", "all", lambda t: LoraConfig(r=4, alpha=8, target_modules=t, rank_pattern={"conv1": 2})),
    "dora": ("lora_unet", "attn+conv", lambda t: LoraConfig(r=3, alpha=5, target_modules=["to_v", "conv1", "conv"],
                                                            use_dora=True)),
    "loha-tucker": ("lycoris", "attn+conv", lambda t: LohaConfig(r=2, alpha=3, target_modules=t,
                                                                 use_effective_conv2d=True)),
    "lokr-both": ("lycoris", "attn", lambda t: LokrConfig(r=2, alpha=3, target_modules=t, decompose_both=True)),
}


@pytest.mark.parametrize("case", CASES)
def test_slimtune_files_run_in_lycoris(case, tmp_path, kohya_loader):
    prefix, preset, make = CASES[case]
    model = denoiser(UNET)
    ours = perturbed(slimtune.adapt(model, make(interop.targets(model, preset))))
    interop.save_kohya(ours, tmp_path / "a.safetensors", prefix=prefix)
    unet = denoiser(UNET)
    count = (kohya_loader if prefix == "lora_unet" else lycoris_load)(tmp_path / "a.safetensors", unet)
    assert count == len(slimtune.adapter_modules(ours))
    assert rel_err(run(unet, UNET), run(ours, UNET)) < 1e-5


@pytest.mark.parametrize("algo, preset, options", [
    ("locon", "unet-convblock-only", dict(dora_wd=True)),
    ("loha", "attn-mlp", dict(use_tucker=True)),
    ("lokr", "unet-convblock-only", dict(full_matrix=True)),
])
def test_lycoris_files_load_here_and_round_trip(algo, preset, options, tmp_path):
    unet = denoiser(UNET)
    network = lycoris_kohya.create_network(1.0, 4, 2, None, None, unet, algo=algo, preset=preset, conv_dim=2,
                                           conv_alpha=1, **options)
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    perturbed(network)
    network.save_weights(str(tmp_path / "l.safetensors"), None, {"ss_network_module": "lycoris.kohya"})
    loaded = interop.load_kohya(denoiser(UNET), tmp_path / "l.safetensors")
    assert len(slimtune.adapter_modules(loaded)) == len(network.unet_loras)
    assert rel_err(run(loaded, UNET), run(unet, UNET)) < 1e-5
    interop.convert(tmp_path / "l.safetensors", tmp_path / "peft", "peft")
    interop.convert(tmp_path / "peft", tmp_path / "k.safetensors", "kohya")
    theirs, back = load_file(tmp_path / "l.safetensors"), load_file(tmp_path / "k.safetensors")
    assert theirs.keys() == back.keys()
    assert all(theirs[k].dtype == back[k].dtype and torch.equal(theirs[k], back[k]) for k in theirs)


def test_what_peft_cannot_hold_is_refused(tmp_path):
    unet = denoiser(UNET)
    # LyCORIS orders a factor larger than the root first (4 channels, factor 4 -> 1 x 4); PEFT does not (4 x 1)
    network = lycoris_kohya.create_network(1.0, 4, 2, None, None, unet, algo="lokr", preset="unet-convblock-only",
                                           conv_dim=2, decompose_both=True, factor=4)
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    network.save_weights(str(tmp_path / "l.safetensors"), None, None)
    with pytest.raises(CheckpointError, match="conv_out's split .* is no PEFT factorization"):
        interop.load_kohya(denoiser(UNET), tmp_path / "l.safetensors")
    unet = denoiser(UNET)
    network = lycoris_kohya.create_network(1.0, 4, 2, None, None, unet, algo="locon", preset="unet-convblock-only",
                                           conv_dim=2, use_tucker=True)
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    network.save_weights(str(tmp_path / "t.safetensors"), None, None)
    with pytest.raises(CheckpointError, match="lora_mid.weight: LoCon's Tucker core"):
        interop.convert(tmp_path / "t.safetensors", tmp_path / "peft", "peft")
