"""slimtune sweep: the seed study's grid, its files (jsonl, markdown, png), resuming, OOM as a status."""
from __future__ import annotations

import json

import pytest
import torch

import slimtune
from slimtune.cli import main
from slimtune.errors import ConfigError
from slimtune.memory.sweep import (SweepSpec, config_key, load_results, render_markdown, run_sweep, sweep_configs,
                                   sweep_method)

from .test_plot import fake_result

HAS_QUANTIZE = hasattr(slimtune, "quantize")
QLORA = "qlora" if HAS_QUANTIZE else "lora"  # LoRA over NF4 (slimtune.quantize / bitsandbytes)
TINY = dict(device="cpu", batch=1, seq=16, rank=4, steps=1)


def test_grid_runs_a_full_fine_tune_once() -> None:
    configs = sweep_configs(SweepSpec(presets=["tiny-llama"], methods=["none", "lora", "qlora"],
                                      backends=["slimtune", "peft"], **TINY))
    assert [(c.method, c.quant, c.backend) for c in configs] == [
        ("none", "none", "slimtune"), ("lora", "none", "slimtune"), ("lora", "none", "peft"),
        ("lora", "nf4", "slimtune"), ("lora", "nf4", "peft")]
    assert [sweep_method(c) for c in configs] == ["none", "lora", "lora", "qlora", "qlora"]
    assert len({config_key(c) for c in configs}) == 5
    assert all(c.device == "cpu" and c.seq == 16 and c.rank == 4 for c in configs)


def test_locon_only_where_there_are_convolutions() -> None:
    configs = sweep_configs(SweepSpec(presets=["tiny-llama", "tiny-unet"], methods=["locon"],
                                      backends=["slimtune"], **TINY))
    assert [c.preset for c in configs] == ["tiny-unet"]


def test_default_presets_follow_the_device() -> None:
    assert SweepSpec(device="cpu").resolved_presets() == ["tiny-llama", "tiny-unet"]
    assert SweepSpec(device="cuda").resolved_presets() == ["llama-7b", "stable-diffusion-1.5"]


@pytest.mark.parametrize("spec, message", [
    (SweepSpec(methods=["lorax"], **TINY), "unknown sweep method 'lorax'"),
    (SweepSpec(backends=["hf"], **TINY), "unknown backend 'hf'"),
    (SweepSpec(presets=["llama-9"], **TINY), "unknown preset"),
])
def test_bad_grids_are_named(spec: SweepSpec, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        sweep_configs(spec)


def test_sweep_end_to_end(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI on tiny presets: every configuration profiled, the three files written."""
    pytest.importorskip("peft")
    pytest.importorskip("diffusers")
    pytest.importorskip("matplotlib")
    pytest.importorskip("bitsandbytes")  # the PEFT backend's QLoRA
    out = tmp_path / "sweep"
    argv = ["sweep", "--device", "cpu", "--presets", "tiny-llama", "tiny-unet", "--methods", "none", QLORA,
            "--backends", "slimtune", "peft", "--seq", "16", "--rank", "4", "--steps", "1", "--out", str(out),
            "--isolate", "none"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    results = load_results(out / "sweep.jsonl")
    assert len(results) == 2 * (1 + 2)
    assert all(r.ok and r.breakdown and r.peak_first_step_bytes for r in results)
    md = (out / "sweep.md").read_text()
    assert md in stdout + "\n" or md.strip() in stdout
    for text in ("| tiny-llama | full fine-tune |", f"| tiny-unet | {QLORA} |", f"| tiny-llama | {QLORA} |",
                 "slimtune created", "PEFT 1 step", "Breakdown at the peak step", "by module kind"):
        assert text in md
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_runs_only_what_is_missing(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran = []

    def fake(options):
        ran.append((options.method, options.backend))
        return fake_result(method=options.method, backend=options.backend)

    monkeypatch.setattr("slimtune.memory.sweep._run_in_process", fake)
    spec = SweepSpec(presets=["tiny-llama"], methods=["lora"], backends=["slimtune"], **TINY)
    configs = sweep_configs(spec)
    # fake results carry llama-7b's name: re-key them to the configurations they stand for
    monkeypatch.setattr("slimtune.memory.sweep.config_key", lambda item: (item.method, item.backend))
    run_sweep(configs, out=tmp_path, plot=False)
    more = sweep_configs(SweepSpec(presets=["tiny-llama"], methods=["lora"], backends=["slimtune", "peft"], **TINY))
    results, files = run_sweep(more, out=tmp_path, resume=True, plot=False)
    assert ran == [("lora", "slimtune"), ("lora", "peft")]
    assert len(load_results(files["jsonl"])) == 2 and [r.backend for r in results] == ["slimtune", "peft"]


def test_out_of_memory_is_recorded_not_raised(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    def oom(_options):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr("slimtune.memory.profile.build_base_model", oom)
    configs = sweep_configs(SweepSpec(presets=["tiny-llama"], methods=["none"], **TINY))
    results, files = run_sweep(configs, out=tmp_path, plot=False)
    assert [r.status for r in results] == ["OOM"] and "out of memory" in results[0].error
    assert "| tiny-llama | full fine-tune | OOM | OOM |" in files["markdown"].read_text()  # OOM while building


def test_markdown_has_the_seed_columns() -> None:
    results = [fake_result(method="none", status="OOM"), fake_result(),
               fake_result(backend="peft", peak_first_step_bytes=20 * 2**30)]
    md = render_markdown(results, title="seed")
    row = next(line for line in md.splitlines() if line.startswith("| llama-7b | lora |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "13.05 (16.3%)"  # after creation, GiB and share of the 80 GiB device
    assert cells[6] == f"{(13 + 3 + 1 + 0.2) / 20:.2f}"  # slimtune's first-step peak over PEFT's
    assert "| llama-7b | full fine-tune | 13.05 (16.3%) | OOM |" in md


def test_isolated_run_of_one_configuration(tmp_path) -> None:
    """Each configuration in its own process (the CUDA default), here on the CPU with the tiniest model."""
    configs = sweep_configs(SweepSpec(presets=["tiny-llama"], methods=["lora"], backends=["slimtune"], **TINY))
    results, files = run_sweep(configs, out=tmp_path, isolate=True, plot=False, timeout=300)
    assert results[0].ok and results[0].breakdown["activations"] > 0
    assert json.loads(files["jsonl"].read_text().splitlines()[0])["status"] == "ok"


def test_merge_pieces_into_one_report(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    for name, result in (("a", fake_result()), ("b", fake_result(backend="peft"))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "sweep.jsonl").write_text(json.dumps(result.to_dict()) + "\n")
    out = tmp_path / "merged"
    assert main(["sweep", "--merge", str(tmp_path / "a" / "sweep.jsonl"), str(tmp_path / "b" / "sweep.jsonl"),
                 "--out", str(out)]) == 0
    md = (out / "sweep.md").read_text()
    assert "| llama-7b | lora | 13.05 (16.3%) |" in md and "1 step ÷ PEFT" in md
    assert (out / "sweep.png").exists() and md.strip() in capsys.readouterr().out
    assert main(["sweep", "--merge", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2
