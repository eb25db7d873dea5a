"""Shared test helpers."""
from __future__ import annotations

import torch

FP32_TOL = 1e-4
BF16_TOL = 1e-2


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """‖got − ref‖ / ‖ref‖ computed in float64 (on ref's device: a CUDA result may be set against a CPU reference)."""
    got, ref = got.detach().double().to(ref.device), ref.detach().double()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def perturb_adapters(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> None:
    """Move every trainable adapter parameter away from its init (LoRA's B starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p.device, p.dtype) * std)


def read_adapter_dir(directory) -> tuple[dict, dict]:
    """``({key: (shape, dtype)}, config JSON with target/exclude lists sorted)`` of an adapter checkpoint."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from slimtune.core.checkpoint import CONFIG_NAME, WEIGHTS_NAME

    directory = Path(directory)
    tensors = {k: (tuple(v.shape), v.dtype) for k, v in load_file(directory / WEIGHTS_NAME).items()}
    config = json.loads((directory / CONFIG_NAME).read_text())
    # "peft_version" names the schema we write (PEFT_SCHEMA_VERSION) or the PEFT that wrote the file: it differs
    # between installed PEFT releases without changing what loads
    config = {k: sorted(v) if k in ("target_modules", "exclude_modules") and isinstance(v, list) else v
              for k, v in config.items() if k != "peft_version"}
    return tensors, config


def assert_same_files(ours, theirs, dtypes: bool = True) -> dict:
    """Our checkpoint directory has PEFT's keys, shapes (and dtypes) and config; returns our config."""
    (our_t, our_j), (their_t, their_j) = read_adapter_dir(ours), read_adapter_dir(theirs)
    if not dtypes:
        our_t, their_t = ({k: v[0] for k, v in t.items()} for t in (our_t, their_t))
    assert our_t == their_t
    newer = {k: our_j[k] for k in set(our_j) - set(their_j)}
    if newer and _installed_peft_older_than_schema():
        # fields of a later PEFT schema than the installed PEFT writes: each at its unset value (None)
        assert all(v is None for v in newer.values()), newer
        our_j = {k: v for k, v in our_j.items() if k not in newer}
    assert our_j == their_j
    return our_j


def _installed_peft_older_than_schema() -> bool:
    """Whether the installed PEFT predates :data:`slimtune.core.peft_format.PEFT_SCHEMA_VERSION` (its files then lack
    the later fields slimtune writes)."""
    import peft
    from packaging.version import Version

    from slimtune.core.peft_format import PEFT_SCHEMA_VERSION

    return Version(peft.__version__) < Version(PEFT_SCHEMA_VERSION)


def check_merge_round_trip(layer, x: torch.Tensor) -> torch.Tensor:
    """Merged output = unmerged output (within the dtype's tolerance); unmerge restores the weight bit for bit.

    Returns the unmerged output."""
    tol = FP32_TOL if x.dtype in (torch.float32, torch.float64) else BF16_TOL
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        assert layer.merged and rel_err(layer(x), y) < tol
        layer.unmerge()
    assert torch.equal(layer.base_layer.weight, w0)
    return y


def run_interpreted(script: str, timeout: float = 600) -> dict:
    """Run ``script`` in a fresh Python with ``TRITON_INTERPRET=1`` (Triton picks interpreter or compiler when a
    kernel is defined, so it needs its own process) and return the JSON it prints after ``RESULTS ``."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")][-1]
    return json.loads(line[len("RESULTS "):])


def check_interpreted_errors(script: str, cases: int, fp32_tol: float = 1e-6, half_tol: float = 2e-3) -> None:
    """Run ``script`` under the interpreter (:func:`run_interpreted`; skipped without triton). Its results map
    ``"<dtype>/<case>"`` to lists of relative errors: expect ``cases`` of them, each error below ``fp32_tol`` for
    float32 cases and ``half_tol`` otherwise."""
    import pytest

    pytest.importorskip("triton")
    results = run_interpreted(script)
    assert len(results) == cases
    for key, errors in results.items():
        tol = fp32_tol if key.startswith("float32/") else half_tol
        assert all(e < tol for e in errors), (key, errors)


def backward_against_reference(got: list, ref: list, device, dtype: torch.dtype, tol: float) -> None:
    """Run backward through the outputs ``got`` (``dtype`` on ``device``) and their float64 references ``ref`` with
    the same random gradients, after checking each output's dtype and relative error below ``tol``."""
    gen = torch.Generator().manual_seed(3)
    dys = [torch.randn(y.shape, generator=gen, dtype=torch.float64) for y in ref]
    torch.autograd.backward(ref, dys)
    torch.autograd.backward(got, [d.to(device, dtype) for d in dys])
    for y, y64 in zip(got, ref):
        assert y.dtype == dtype and rel_err(y, y64) < tol


def dora_layer_errors(layer, x: torch.Tensor, y: torch.Tensor, dy: torch.Tensor) -> dict:
    """Relative errors of a DoRA Linear layer's output ``y`` and the gradients ``y.backward(dy)`` left on x and on its
    parameters, against DoRA's float64 definition (``dora_linear_reference``); m only where it is trained."""
    from slimtune.methods.dora.norm import dora_linear_reference

    w = layer.base_layer.weight.double()
    b = layer.base_layer.bias.double() if layer.base_layer.bias is not None else None
    params = (layer.lora_A, layer.lora_B, layer.magnitude)
    leaves = [p.detach().double().requires_grad_() for p in params]
    x64 = x.detach().double().requires_grad_()
    ref = dora_linear_reference(x64, w, b, *leaves, layer.scaling)
    ref.backward(dy.double())
    errors = {"y": rel_err(y, ref), "x": rel_err(x.grad, x64.grad)}
    errors.update({name: rel_err(p.grad, leaf.grad) for name, p, leaf in zip("ABm", params, leaves)
                   if p.requires_grad})
    return errors


def causal_lm_step_saved(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list, int]:
    """One training step of a causal LM on ``ids``: ``(logits, the trainable parameters' gradients, bytes saved for
    backward in the forward, the model's parameters aside)``."""
    from slimtune.memory.accounting import SavedTensorMeter

    meter = SavedTensorMeter(exclude=model.parameters())
    with meter.record():
        logits = model(ids).logits
    logits.float().pow(2).mean().backward()
    return logits, [p.grad for p in model.parameters() if p.requires_grad], meter.bytes


def adapted_pair(base: torch.nn.Module, config, strip: bool = False) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Two copies of ``base`` adapted alike (the same initialisation, adapters perturbed alike), the first with its lean
    layers removed (with every hook ``adapt`` installed, or with ``strip`` their forwards alone: the adapters' own
    hooks stay)."""
    import copy

    import slimtune
    from slimtune.core import lean_layers
    from slimtune.core.inject import HOOKS_ATTR

    models = []
    for _ in range(2):
        torch.manual_seed(5)
        model = slimtune.adapt(copy.deepcopy(base), config)
        perturb_adapters(model, seed=3)
        models.append(model)
    if strip:
        for m in models[0].modules():
            if lean_layers.installed(m):
                del m.forward
    else:
        getattr(models[0], HOOKS_ATTR)()
    return models[0], models[1]
