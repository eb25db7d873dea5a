"""`slimtune convert IN OUT --to peft|kohya`, in-process through slimtune.cli.main: both ways, exact; user errors
are one line with exit status 2."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import slimtune
from slimtune import HraConfig, LokrConfig, interop
from slimtune.cli import main
from tests.interop.denoisers import UNET, denoiser, perturbed

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def test_convert_both_ways(tmp_path, capsys):
    model = denoiser(UNET)
    ours = perturbed(slimtune.adapt(model, LokrConfig(r=2, alpha=3, target_modules=interop.targets(model, "attn"))))
    interop.save_kohya(ours, tmp_path / "a.safetensors")
    assert main(["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "peft"), "--to", "peft",
                 "--base", "tiny-unet"]) == 0
    assert "PEFT LOKR adapter, 48 modules, r=2, alpha=3" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "peft"), str(tmp_path / "b.safetensors"), "--to", "kohya",
                 "--prefix", "lycoris"]) == 0
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert {k.replace("lora_unet_", "lycoris_", 1): v for k, v in a.items()}.keys() == b.keys()
    assert all(torch.equal(v, b[k.replace("lora_unet_", "lycoris_", 1)]) for k, v in a.items())


def test_user_errors_are_one_line(tmp_path, capsys):
    slimtune.save_adapter(slimtune.adapt(denoiser(UNET), HraConfig(r=2, target_modules=["to_q"])), tmp_path / "hra")
    for argv, message in [
        ([str(tmp_path / "missing.safetensors"), str(tmp_path / "p"), "--to", "peft"], "does not exist"),
        ([str(tmp_path / "hra"), str(tmp_path / "p"), "--to", "peft"], "is a directory (a PEFT adapter?)"),
        ([str(tmp_path / "hra"), str(tmp_path / "k.safetensors"), "--to", "kohya"], "HraConfig adapters have no kohya"),
        ([str(tmp_path / "x.safetensors"), str(tmp_path / "p"), "--to", "peft", "--base", "llama-7b"],
         "not a diffusion preset"),
        ([str(tmp_path / "hra"), str(tmp_path / "p"), "--to", "onnx"], "invalid choice"),
    ]:
        assert main(["convert", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err
