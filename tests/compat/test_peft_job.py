"""A PEFT user's whole job runs on slimtune with one import line changed (:mod:`tests.compat.peft_job`), for every
method, for ``modules_to_save`` and for two named adapters: transformers' Trainer writes adapter-only checkpoints in
PEFT's format that PEFT loads to the same logits, no larger than PEFT's own; resuming from one is exact; the merged
export reloads with ``from_pretrained`` to identical logits."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimtune.core.checkpoint import WEIGHTS_NAME
from tests.compat.peft_job import load_job
from tests.helpers import read_adapter_dir

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
# case -> (PEFT config class, model kind, config keywords as a PEFT user spells them, a second adapter's or None)
CASES = {
    "lora": ("LoraConfig", "causal", dict(LORA, lora_dropout=0.1, task_type="CAUSAL_LM"), None),
    "dora": ("LoraConfig", "causal", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"]),
             None),
    "hra": ("HRAConfig", "causal", dict(r=4, target_modules=["q_proj", "v_proj"]), None),
    "loha": ("LoHaConfig", "causal", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), None),
    "lokr": ("LoKrConfig", "causal", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), None),
    "modules_to_save": ("LoraConfig", "classifier", dict(LORA, modules_to_save=["score"]), None),
    "two_adapters": ("LoraConfig", "causal", LORA, dict(r=2, lora_alpha=4, target_modules=["k_proj", "o_proj"])),
}
CHECKPOINTS = ("checkpoint-1", "checkpoint-2", "adapter")


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=x).logits


def dir_size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file() and not f.is_symlink())  # links: no bytes


def adapter_dirs(directory: Path, second: dict | None) -> list[Path]:
    return [directory] + ([directory / "second"] if second is not None else [])


def peft_load(job: dict, kind: str, directory: Path, second: dict | None) -> torch.nn.Module:
    model = peft.PeftModel.from_pretrained(job["make_base"](kind), directory)
    if second is not None:
        model.load_adapter(directory / "second", adapter_name="second")
        model.set_adapter("second")
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_peft_job_runs_unchanged(case, tmp_path):
    config_class, kind, config, second = CASES[case]
    ours, theirs = load_job("slimtune", config_class), load_job("peft", config_class)
    model, merged, reloaded = ours["run"](str(tmp_path / "ours"), kind, config, second)
    theirs["run"](str(tmp_path / "peft"), kind, config, second)  # PEFT's files for the same job: the yardstick
    x = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    trained = logits(model, x)

    for name in CHECKPOINTS:
        directory, reference = tmp_path / "ours" / name, tmp_path / "peft" / name
        # never the full state: a link to the active adapter's file (the second one's, when it is made active)
        weights, active = directory / "model.safetensors", adapter_dirs(directory, second)[-1]
        assert weights.is_symlink() and weights.resolve() == (active / "adapter_model.safetensors").resolve()
        for ours_dir, peft_dir in zip(adapter_dirs(directory, second), adapter_dirs(reference, second)):
            assert {k: v[0] for k, v in read_adapter_dir(ours_dir)[0].items()} == \
                {k: v[0] for k, v in read_adapter_dir(peft_dir)[0].items()}
        assert dir_size(directory) <= 1.1 * dir_size(reference), name
        in_peft = logits(peft_load(theirs, kind, directory, second), x)
        in_ours = logits(peft_load(ours, kind, directory, second), x)  # slimtune's PeftModel loads it the same way
        assert (in_peft - in_ours).abs().max() <= 1e-5, name
    assert (in_peft - trained).abs().max() <= 1e-5  # the final adapter is the trained model

    assert set(merged.state_dict()) == set(ours["make_base"](kind).state_dict())  # q_proj.weight, no base_layer
    assert torch.equal(logits(reloaded, x), logits(merged, x))
    assert (logits(merged, x) - trained).abs().max() <= 1e-4

    resumed = tmp_path / "resumed"
    ours["run"](str(resumed), kind, config, second, resume=str(tmp_path / "ours" / "checkpoint-1"))
    for a, b in zip(adapter_dirs(tmp_path / "ours" / "adapter", second), adapter_dirs(resumed / "adapter", second)):
        want, got = load_file(a / WEIGHTS_NAME), load_file(b / WEIGHTS_NAME)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_trainer_checkpoints_do_not_load_as_a_full_model(tmp_path):
    """What Trainer writes holds the adapter only: transformers' from_pretrained refuses the directory (no
    config.json) rather than filling q/k/v/o with random weights."""
    job = load_job("slimtune", "LoraConfig")
    job["run"](str(tmp_path), "causal", LORA)
    with pytest.raises(OSError):
        transformers.LlamaForCausalLM.from_pretrained(tmp_path / "checkpoint-1", local_files_only=True)
