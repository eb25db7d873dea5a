"""Training checkpoints: the adapter in PEFT's format, and beside it everything a resumed run needs to continue
bit for bit.

``OUT/checkpoint-000100/`` holds

* ``adapter_config.json`` + ``adapter_model.safetensors`` — the adapter as PEFT writes it, a classification head
  (PEFT's ``modules_to_save``) included (``peft.PeftModel.from_pretrained(base, dir)`` and
  :func:`slimtune.load_adapter` read it), gathered whole on rank 0 under FSDP;
* ``trainable.safetensors`` — every trainable parameter, by its name in the training objective;
* ``optimizer.safetensors`` — AdamW's state per parameter name (``<name>/exp_avg`` ...), unsharded;
* ``rng.safetensors`` — each process's torch (and CUDA) generator state;
* ``trainer_state.json`` — step, data position, tokens seen, the scheduler's and the optimizer's hyper-parameter
  state, the number of processes.

Only JSON and safetensors are written and read (nothing is unpickled). States are gathered unsharded through
``torch.distributed.checkpoint.state_dict`` (full state dicts keyed by parameter name), so a run saved by N
processes resumes on M: FSDP reshards on load. A checkpoint is written into a hidden temporary directory and then
renamed into place (an atomic rename): a kill during a save leaves the previous checkpoint as the latest.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.checkpoint import CONFIG_NAME, PEFT_PREFIX, WEIGHTS_NAME, peft_config_dict
from ..core.inject import adapter_modules, trained_copies
from ..errors import CheckpointError

STATE_NAME = "trainer_state.json"
TRAINABLE_NAME = "trainable.safetensors"
OPTIMIZER_NAME = "optimizer.safetensors"
RNG_NAME = "rng.safetensors"
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
FORMAT = 1


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / f"checkpoint-{step:06d}"


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """``(step, directory)`` of every complete checkpoint in ``out``, oldest first."""
    found = []
    for path in out.iterdir() if out.is_dir() else ():
        match = CHECKPOINT_RE.fullmatch(path.name)
        if match and (path / STATE_NAME).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


# -- gathering ----------------------------------------------------------------------------------------
def gather(objective: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """``(trainable parameters, optimizer state)`` by parameter name, unsharded, on the CPU (every process calls
    this; under FSDP it gathers)."""
    # imported here: torch.distributed.checkpoint takes seconds to import, and every `slimtune` command imports this
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    params, optim = get_state_dict(objective, optimizer, options=options)
    # row-major copies: safetensors writes contiguous tensors only (a B stacked wide is column-major: core.wide_rows)
    return {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in params.items()}, optim


def _name_in(root: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in root.named_modules() if module is target)


def peft_tensors(objective: nn.Module, part: nn.Module, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys (``base_model.model.<module>.<suffix>``; a module to save under its
    own path, ``base_model.model.classifier.weight``), taken from ``params`` (trainable parameters by their name in
    ``objective``); ``part`` is the adapted model."""
    prefix = _name_in(objective, part)
    out = {}
    for name, adapter in adapter_modules(part):
        own = dict(adapter.named_parameters(recurse=False))
        for suffix, param in adapter.peft_parameters().items():
            attr = next(n for n, p in own.items() if p is param)
            out[f"{PEFT_PREFIX}{name}.{suffix}"] = params[".".join(x for x in (prefix, name, attr) if x)].contiguous()
    for name, copy in trained_copies(part):
        for key in copy.peft_tensors():
            full = ".".join(x for x in (prefix, name, "trained_module", key) if x)
            out[f"{PEFT_PREFIX}{name}.{key}"] = params[full].contiguous()
    return out


# -- writing ------------------------------------------------------------------------------------------
def write_adapter(directory: Path, part: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """PEFT's two files into ``directory``, each written to a temporary name and renamed."""
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(peft_config_dict(part), indent=2, sort_keys=True)
    for name, content in ((WEIGHTS_NAME, tensors), (CONFIG_NAME, text)):
        tmp = directory / f".{name}.tmp"
        if isinstance(content, str):
            tmp.write_text(content, encoding="utf-8")
        else:
            save_file(content, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, directory / name)


def _flatten_optimizer(optim: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for name, state in optim["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{name}/{key}"] = value
    return tensors, scalars


def _numbers(value: Any) -> Any:
    """``value`` with every one-element tensor in it (dicts, lists, tuples) a Python number, for JSON: ``--capture``
    keeps the learning rate as a tensor the graph reads, in the optimizer's groups and the scheduler's state."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_numbers(v) for v in value)
    return value


def save(out: Path, step: int, state: dict[str, Any], params: dict[str, torch.Tensor], optim: dict,
         rng: list[dict[str, torch.Tensor]], adapter: dict[str, torch.Tensor], part: nn.Module, keep: int) -> Path:
    """Write checkpoint ``step`` atomically (main process only), then delete all but the ``keep`` newest."""
    final = checkpoint_dir(out, step)
    tmp = out / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write_adapter(tmp, part, adapter)
    save_file(params, str(tmp / TRAINABLE_NAME))
    tensors, scalars = _flatten_optimizer(optim)
    save_file(tensors, str(tmp / OPTIMIZER_NAME))
    save_file({f"rank{r}.{k}": v.contiguous() for r, states in enumerate(rng) for k, v in states.items()},
              str(tmp / RNG_NAME))
    record = _numbers(dict(state, format=FORMAT, world=len(rng), optimizer_groups=optim["param_groups"],
                           optimizer_scalars=scalars))
    (tmp / STATE_NAME).write_text(json.dumps(record, indent=1), encoding="utf-8")
    if final.exists():  # the same step saved by an earlier, interrupted attempt
        old = out / f".{final.name}.old"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    for _, path in checkpoints(out)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def remove_stale(out: Path) -> None:
    """Delete the temporary directories an interrupted save left behind."""
    for path in out.glob(".checkpoint-*"):
        shutil.rmtree(path, ignore_errors=True)


# -- reading ------------------------------------------------------------------------------------------
def read_state(directory: Path) -> dict[str, Any]:
    try:
        state = json.loads((directory / STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{directory / STATE_NAME}: cannot read it ({exc})") from None
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{directory / STATE_NAME}: checkpoint format {state.get('format')!r}, expected {FORMAT}")
    return state


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error type for damaged files
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None


def load(directory: Path, objective: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore the trainable parameters and the optimizer (resharding under FSDP); returns the trainer state
    (with the RNG states under ``"rng"``)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = read_state(directory)
    params = _load(directory / TRAINABLE_NAME)
    expected = {n for n, p in objective.named_parameters() if p.requires_grad}
    if set(params) != expected:
        extra, missing = sorted(set(params) - expected), sorted(expected - set(params))
        raise CheckpointError(f"{directory}: its trainable parameters do not match this model's "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")
    flat = _load(directory / OPTIMIZER_NAME)
    optim_state: dict[str, dict[str, Any]] = {}
    for key, value in list(flat.items()) + list(state["optimizer_scalars"].items()):
        name, _, field = key.rpartition("/")
        optim_state.setdefault(name, {})[field] = value
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in state["optimizer_groups"]]
    set_state_dict(objective, optimizer, model_state_dict=params,
                   optim_state_dict={"state": optim_state, "param_groups": groups},
                   options=StateDictOptions(full_state_dict=True, strict=False))
    rng: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in _load(directory / RNG_NAME).items():
        rank, _, kind = key.partition(".")
        rng.setdefault(int(rank[4:]), {})[kind] = value
    state["rng"] = rng
    return state
