"""slimtune.memory.plot: stacked-bar PNGs of profile results (synthetic results, no training)."""
from __future__ import annotations

import sys

import pytest

from slimtune.memory.options import ProfileOptions
from slimtune.memory.result import ProfileResult
from slimtune.models import MissingDependencyError

GIB = 2**30
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_result(method: str = "lora", backend: str = "slimtune", status: str = "ok", cuda: bool = True,
                **fields) -> ProfileResult:
    """A result as a CUDA (or CPU) run would report it, without running anything."""
    options = ProfileOptions(preset="llama-7b", method=method, backend=backend, batch=1, seq=512, device="cpu",
                             dtype="bfloat16", steps=3)
    parts = dict(base_weights=13 * GIB, adapter_weights=GIB // 20, gradients=GIB // 20, optimizer_state=GIB // 10,
                 activations=3 * GIB, temporary=GIB if cuda else None)
    base = dict(status=status, memory_kind="cuda allocator" if cuda else "cpu accounted",
                device_memory_bytes=80 * GIB, mem_created_bytes=13 * GIB + GIB // 20)
    if status == "ok":
        base.update(breakdown=parts, peak_bytes=sum(v or 0 for v in parts.values()),
                    peak_first_step_bytes=sum(v or 0 for v in parts.values()), mem_after_step_bytes=14 * GIB,
                    activations_by_module={"linear": GIB, "attention": GIB // 2, "activation": GIB, "loss": GIB // 2},
                    step_time_s=0.5)
    base.update(fields)
    return ProfileResult.for_options(options, **base)


def test_plot_writes_a_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from slimtune.memory.plot import plot_results

    results = [fake_result(), fake_result(backend="peft"),
               fake_result(method="none", status="OOM", peak_bytes=79 * GIB),
               fake_result(status="error", mem_created_bytes=None)]
    path = plot_results(results, tmp_path / "sub" / "plot.png", title="test", budget_bytes=16 * GIB)
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_plot_of_cpu_results_in_mib(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from slimtune.memory.plot import plot_results

    small = fake_result(cuda=False)
    small.breakdown = {k: (v // 1024 if v is not None else None) for k, v in small.breakdown.items()}
    small.peak_bytes = small.mem_created_bytes = 20 * 2**20
    assert plot_results([small], tmp_path / "cpu.png").read_bytes().startswith(PNG_MAGIC)


def test_plot_refuses_nothing(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from slimtune.memory.plot import plot_results

    with pytest.raises(ValueError, match="no results"):
        plot_results([], tmp_path / "empty.png")


def test_missing_matplotlib_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from slimtune.models.deps import require_pyplot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'slimtune\[plot\]'"):
        require_pyplot()


def test_profile_plot_without_matplotlib_fails_before_running(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    from slimtune.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    ran = []
    monkeypatch.setattr("slimtune.memory.profile.profile_options", lambda *a, **k: ran.append(1))
    assert main(["profile", "--device", "cpu", "--plot", str(tmp_path / "x.png")]) == 1
    assert not ran and "matplotlib" in capsys.readouterr().err
