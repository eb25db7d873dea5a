"""``slimtune train --task diffusion --data FILE.safetensors``: precomputed latents and text embeddings train a UNet
and a DiT; each sample is a row of the file with its own noise; files of the wrong shape or keys are refused,
naming the key."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from slimtune.models.workload import make_inputs
from slimtune.train.latents import KEYS, LatentData, _get

from .conftest import run_train

pytest.importorskip("diffusers")


def latents_file(path, preset: str, rows: int = 6, resolution: int | None = None, **changes) -> str:
    """A file of ``rows`` samples of the shapes ``preset`` takes (random values), with ``changes`` applied."""
    from slimtune.models.presets import get_preset

    spec = get_preset(preset)
    template = make_inputs(spec, None, rows, 0, "cpu", torch.float32, torch.Generator().manual_seed(3),
                           resolution=resolution)
    tensors = {key: _get(template, where).contiguous() for key, where in KEYS[spec.family].items()
               if _get(template, where) is not None}
    for key, value in changes.items():
        if value is None:
            tensors.pop(key)
        else:
            tensors[key] = value
    save_file(tensors, str(path))
    return str(path)


@pytest.mark.parametrize("preset", ["tiny-unet", "tiny-dit"])
def test_precomputed_latents_train(preset, tmp_path, capsys):
    data = latents_file(tmp_path / "latents.safetensors", preset)
    code, events, err = run_train(["--task", "diffusion", "--preset", preset, "--data", data, "--out",
                                   str(tmp_path / "out"), "--batch", "2", "--max-steps", "3", "--rank", "4",
                                   "--lr", "1e-3", "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    steps = [e for e in events if e["event"] == "step"]
    assert len(steps) == 3 and all(0 < e["loss"] < 10 for e in steps)


def test_each_sample_is_a_row_with_its_own_noise(tmp_path):
    from slimtune.models.presets import get_preset

    spec = get_preset("tiny-unet")
    path = latents_file(tmp_path / "l.safetensors", "tiny-unet", rows=3)
    data = LatentData(path, spec, torch.float32, seed=0)
    from safetensors.torch import load_file

    rows = load_file(path)["latents"]
    firsts = [data.inputs(p, torch.Generator().manual_seed(p))["sample"] for p in range(6)]
    # every epoch (3 positions) visits each row once, in a seeded order
    for epoch in (firsts[:3], firsts[3:]):
        assert sorted(int(torch.argmin(torch.stack([(s - r).abs().sum() for r in rows]))) for s in epoch) == [0, 1, 2]


def _bad(case: str, r: int) -> tuple[dict, str]:
    """A change to a good tiny-unet file (latents [6, 4, r, r]) and the message it must give."""
    return {
        "channels": ({"latents": torch.zeros(6, 3, r, r)}, f"'latents' rows are [3, {r}, {r}], but tiny-unet takes "
                                                          f"[4, {r}, {r}]"),
        "missing": ({"encoder_hidden_states": None}, "missing encoder_hidden_states"),
        "unknown": ({"extra": torch.zeros(6, 2)}, "unknown extra"),
        "rows": ({"latents": torch.zeros(5, 4, r, r)}, "the same number of rows"),
        "square": ({"latents": torch.zeros(6, 4, r, r + 8)}, "must be [N, C, H, H] (square)"),
        "integers": ({"latents": torch.zeros(6, 4, r, r, dtype=torch.int32)}, "must be floating point"),
    }[case]


@pytest.mark.parametrize("case", ["channels", "missing", "unknown", "rows", "square", "integers"])
def test_bad_files_are_refused(case, tmp_path, capsys):
    from slimtune.models.presets import get_preset

    r = make_inputs(get_preset("tiny-unet"), None, 1, 0, "cpu", torch.float32)["sample"].shape[-1]
    change, message = _bad(case, r)
    data = latents_file(tmp_path / "bad.safetensors", "tiny-unet", **change)
    code, _, err = run_train(["--task", "diffusion", "--preset", "tiny-unet", "--data", data, "--out",
                              str(tmp_path / "out"), "--max-steps", "1", "--device", "cpu", "--json"], capsys)
    assert code == 2 and f"--data {data}" in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_rows_are_read_from_the_file_when_used_and_the_data_pickles(tmp_path):
    """Only the header is read up front; a row comes from the memory-mapped file in the run's dtype; a pickled copy
    (a worker process's) opens the file itself."""
    import pickle

    from safetensors.torch import load_file

    from slimtune.models.presets import get_preset

    path = latents_file(tmp_path / "l.safetensors", "tiny-unet", rows=4)
    data = LatentData(path, get_preset("tiny-unet"), torch.bfloat16, seed=0)
    assert len(data) == 4 and not hasattr(data, "tensors")
    stored = load_file(path)
    for index in range(4):
        row = data.row("encoder_hidden_states", index)
        assert row.dtype == torch.bfloat16 and torch.equal(row, stored["encoder_hidden_states"][index:index + 1]
                                                           .to(torch.bfloat16))
    twin = pickle.loads(pickle.dumps(data))
    assert torch.equal(twin.row("latents", 2), data.row("latents", 2))


def test_a_corrupt_file_is_refused_by_name(tmp_path, capsys):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    code, _, err = run_train(["--task", "diffusion", "--preset", "tiny-unet", "--data", str(path), "--out",
                              str(tmp_path / "out"), "--max-steps", "1", "--device", "cpu", "--json"], capsys)
    assert code == 2 and f"--data {path}: not a readable safetensors file" in err, err
