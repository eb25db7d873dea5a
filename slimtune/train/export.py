"""``slimtune export``: a trained adapter folded into its base model, saved as a plain model that
``from_pretrained`` (transformers or diffusers) loads without slimtune or PEFT.

The source is a ``slimtune train`` output directory (``run.json`` says how the base was built: a model directory or
a preset with its seed, the task, the class names), one of its checkpoints (``OUT/checkpoint-N``), or any PEFT /
slimtune adapter directory together with ``--model DIR`` or ``--preset NAME`` (default: the local directory its
``base_model_name_or_path`` names). The steps:

1. the base model is built as the run built it, in float32. Random base weights (a preset, or a model
   directory without weight files) are drawn again with the run's seed on the device type the run drew them on
   (``run.json``): the CPU's and CUDA's generators differ, so a run drawn on CUDA is refused on the CPU;
2. the adapter is loaded (:func:`slimtune.load_adapter`), a classification head as its trained copy;
3. a probe batch goes through the adapted model, the adapters are merged and taken out
   (:func:`slimtune.unload` with ``merge=True``), the probe goes through the plain model, and the two outputs are
   compared (relative error, refused above :data:`TOLERANCE`; the adapter's own effect, adapted vs base output,
   is reported beside it): no silent wrong export. All of this runs in
   float32 (4 bytes per parameter where the merge runs), whatever the export dtype: in bf16 the output's own
   rounding (~1e-2 relative) is as large as a young adapter's whole effect, so the comparison would prove nothing
   there; each merged weight is rounded once, at the end;
4. the model is cast to the export dtype and written with its own ``save_pretrained`` (safetensors) — a diffusion run's denoiser alone — with
   the model directory's tokenizer and ``slimtune_export.json`` (source, base, the check), into a temporary
   directory renamed into place.

A QLoRA run (``--quant nf4``) merges onto the base's original dense weights by default (``base="original"``, as
one merges after QLoRA with PEFT); ``base="dequantized"`` merges onto its NF4 round trip instead, the weights the
adapter was trained against (the merged model then computes what training computed).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ..core.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_adapter, read_adapter_config
from ..core.config import CLASSIFIER_HEADS
from ..core.inject import adapter_modules, disable_adapters, unload
from ..errors import CheckpointError, ConfigError
from ..memory.profile import has_weights
from ..models.diffusion import DiffusionModel, DiffusionPreset
from ..models.presets import dtype_name, get_preset, resolve_dtype
from ..models.workload import make_inputs
from ..quant import dequantize, quantize
from .build import build_base, diffusion_spec, head_name, read_model_config, trained_part
from .config import TrainConfig
from .data import HFTokenizer, has_tokenizer
from .rundir import RUN_NAME, RunDir

RECORD_NAME = "slimtune_export.json"
BASES = ("original", "dequantized")
#: largest accepted relative difference between the adapted and the merged model's outputs (float32)
TOLERANCE = 1e-4
PROBE_TOKENS = 16


@dataclasses.dataclass
class Source:
    """Where the adapter is and how to build its base: ``cfg`` (the run's settings, or what ``--model`` /
    ``--preset`` give), the run's ``labels`` (class names) and ``num_labels``, and the device type the run drew
    random base weights on (``None``: not recorded, or not a run)."""

    adapter_dir: Path
    method: str  # as PEFT names it (:func:`adapter_method`)
    cfg: TrainConfig
    labels: list[str] | None
    num_labels: int | None
    drawn_on: str | None

    @property
    def random_base(self) -> bool:
        """Whether the base weights are drawn from the seed (a preset, or a model directory without weights)."""
        return self.cfg.preset is not None or not has_weights(str(self.cfg.model_dir))

    def device(self, asked: str | None) -> torch.device:
        """Where to build the base: ``asked``, else where the run drew its random weights, else the CPU; refused
        where random weights would come out other than the run's (the CPU's and CUDA's generators differ)."""
        if not self.random_base:
            return torch.device(asked or "cpu")
        if self.drawn_on is None and asked is None and self.cfg.out:
            raise ConfigError("the run's base weights are random (drawn from its seed), and its run.json does not say "
                              "on which device: pass --device as the run trained (cpu or cuda)")
        device = torch.device(asked or self.drawn_on or "cpu")
        if self.drawn_on is not None and device.type != self.drawn_on or (
                device.type == "cuda" and not torch.cuda.is_available()):
            raise ConfigError(f"the run's base weights are random ({self.cfg.model_name}, drawn from its seed on "
                              f"{self.drawn_on or device.type}): they can be drawn again only there (export on a "
                              f"machine with that device, --device {self.drawn_on or device.type})")
        return device


@dataclasses.dataclass
class ExportResult:
    out: Path
    method: str
    base: str
    dtype: str
    adapted_layers: int
    relative_error: float  # merged vs adapted model, float32
    adapter_effect: float  # adapted vs base model: the size of what the merge had to keep


def _run_record(directory: Path) -> dict[str, Any] | None:
    """``directory``'s ``run.json`` (None when it has none)."""
    record = RunDir(directory).recorded()
    if record is not None and not isinstance(record.get("config"), dict):
        raise ConfigError(f"{directory / RUN_NAME} is not a slimtune run record")
    return record


def adapter_method(raw: dict[str, Any], where: Path) -> str:
    """The method of an ``adapter_config.json`` (``raw``, read from ``where``) as PEFT names it (``LORA``,
    ``LORA+DoRA``, ``LOHA``, ...)."""
    if "peft_type" not in raw:
        raise CheckpointError(f"{where / CONFIG_NAME} has no peft_type: not an adapter config")
    return str(raw["peft_type"]) + ("+DoRA" if raw.get("use_dora") else "")


def _recorded_base(raw: dict[str, Any], adapter_dir: Path) -> str:
    """The local model directory the adapter's config names as its base (``base_model_name_or_path``)."""
    named = raw.get("base_model_name_or_path")
    if not named:
        raise ConfigError(f"{adapter_dir} is an adapter directory whose config names no base model: give it, --model "
                          "DIR or --preset NAME")
    if not (Path(named) / "config.json").is_file():
        raise ConfigError(f"{adapter_dir}: its base model {named!r} is not a local model directory (slimtune downloads "
                          "nothing): give it, --model DIR")
    return str(named)


def _task_of_adapter(raw: dict[str, Any], model_dir: str | None) -> str:
    if model_dir is not None and "_class_name" in read_model_config(model_dir):
        return "diffusion"
    return "classification" if raw.get("task_type") == "SEQ_CLS" else "causal-lm"


def _head_outputs(adapter_dir: Path) -> int:
    """A sequence-classification adapter's number of classes: the smallest leading dimension among its saved
    head's 2-D weights (``[num_labels, hidden]``; a two-layer head's first layer is ``[hidden, hidden]``)."""
    with safe_open(str(adapter_dir / WEIGHTS_NAME), "pt") as fh:
        shapes = [fh.get_slice(k).get_shape() for k in fh.keys()
                  if any(f".{h}." in k for h in CLASSIFIER_HEADS) and k.endswith(".weight")]
    shapes = [s for s in shapes if len(s) == 2]
    if not shapes:
        raise CheckpointError(f"{adapter_dir / WEIGHTS_NAME}: a SEQ_CLS adapter without its classification head "
                              "(classifier / score weights)")
    return min(s[0] for s in shapes)


def resolve_source(source: str | os.PathLike, model_dir: str | None = None, preset: str | None = None) -> Source:
    """The adapter and its base: a run directory, a run's checkpoint, or an adapter directory plus a base."""
    path = Path(source).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{path}: not a directory (give a slimtune train output directory, one of its "
                          "checkpoint-N directories, or a PEFT adapter directory)")
    record = _run_record(path)
    if record is None and (path / CONFIG_NAME).is_file():
        record = _run_record(path.parent)  # a run's checkpoint-N
    if record is not None:
        if model_dir is not None or preset is not None:
            raise ConfigError(f"{path} is a slimtune run: its base model is the run's own (drop --model / --preset)")
        if not (path / CONFIG_NAME).is_file():
            raise ConfigError(f"{path} holds no adapter ({CONFIG_NAME}): the run has not finished; export one of "
                              f"its checkpoints instead ({path}/checkpoint-N)")
        method = adapter_method(read_adapter_config(path), path)
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        cfg = TrainConfig(**{k: v for k, v in record["config"].items() if k in fields})
        return Source(path, method, cfg, record.get("labels"), record.get("num_labels"), record.get("device"))
    if not (path / CONFIG_NAME).is_file():
        raise ConfigError(f"{path} holds neither a slimtune run ({RUN_NAME}) nor an adapter ({CONFIG_NAME})")
    raw = read_adapter_config(path)  # a readable adapter config, before any model is built
    method = adapter_method(raw, path)
    if model_dir is not None and preset is not None:
        raise ConfigError("give one base model: --model DIR or --preset NAME")
    if model_dir is None and preset is None:
        model_dir = _recorded_base(raw, path)
    if model_dir is not None and not (Path(model_dir) / "config.json").is_file():
        raise ConfigError(f"--model {model_dir} is not a Hugging Face model directory (no config.json)")
    if preset is not None:
        spec = get_preset(preset)
        task = "diffusion" if isinstance(spec, DiffusionPreset) else "causal-lm"
    else:
        task = _task_of_adapter(raw, model_dir)
    num_labels = _head_outputs(path) if task == "classification" else None
    cfg = TrainConfig(out="", model_dir=model_dir, preset=preset, task=task)
    return Source(path, method, cfg, None, num_labels, None)


def _probe_inputs(model: nn.Module, cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """A small seeded batch of the model's inputs (token ids, or a diffusion sample)."""
    gen = torch.Generator().manual_seed(0)
    if isinstance(model, DiffusionModel):
        spec = get_preset(cfg.preset) if cfg.preset is not None else diffusion_spec(str(cfg.model_dir))
        inputs = make_inputs(spec, None, 1, 0, "cpu", dtype, gen)
        inputs.pop("target", None)
        return {k: ({kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict) else v.to(device))
                for k, v in inputs.items()}
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (2, PROBE_TOKENS), generator=gen).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def _outputs(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    out = model(**inputs)
    tensor = out if isinstance(out, torch.Tensor) else out.logits
    return tensor.detach().double().cpu()


def _relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    scale = reference.norm().item()
    return (other - reference).norm().item() / (scale if scale > 0 else 1.0)


def build_export_model(src: Source, device: torch.device, dtype: torch.dtype, base: str) -> nn.Module:
    """The base model (dense, ``dtype``, on ``device``) with the adapter loaded, not yet merged."""
    cfg = src.cfg
    run_dtype = resolve_dtype(cfg.dtype) if cfg.dtype is not None else dtype
    model = build_base(dataclasses.replace(cfg, dtype=dtype_name(run_dtype)), device, src.num_labels)
    if run_dtype != dtype:
        model = model.to(dtype)
    if cfg.task == "classification":
        config = model.config
        if src.labels:
            config.id2label = dict(enumerate(src.labels))
            config.label2id = {name: i for i, name in enumerate(src.labels)}
        tokenizer_dir = cfg.model_dir if cfg.model_dir is not None and has_tokenizer(cfg.model_dir) else None
        if getattr(config, "pad_token_id", None) is None and tokenizer_dir is not None:
            config.pad_token_id = HFTokenizer(tokenizer_dir).pad_id  # as training set it (decoder classifiers)
    if base == "dequantized":
        part = trained_part(model)
        head = [head_name(model)] if cfg.task == "classification" else None
        quantize(part, "nf4", compute_dtype=dtype, exclude=head)
        dequantize(part, dtype)
    model.eval()
    try:
        load_adapter(trained_part(model), src.adapter_dir)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} (is {src.adapter_dir} an adapter of this base model?)") from None
    return model


def _check_out(out: Path) -> None:
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty directory")
    if not out.parent.exists():
        raise ConfigError(f"--out {out}: its parent directory does not exist")


def export_merged(source: str | os.PathLike, out: str | os.PathLike, model_dir: str | None = None,
                  preset: str | None = None, dtype: str | None = None, device: str | None = None,
                  base: str = "original") -> ExportResult:
    """Merge the adapter of ``source`` into its base model and save the plain model at ``out`` (see the module
    docstring); returns what was written and the adapted-vs-merged relative error of the probe batch."""
    if base not in BASES:
        raise ConfigError(f"unknown --base {base!r}; choose from {', '.join(BASES)}")
    out = Path(out).expanduser().absolute()
    _check_out(out)
    src = resolve_source(source, model_dir, preset)
    if base == "dequantized" and src.cfg.out and src.cfg.quant != "nf4":
        raise ConfigError("--base dequantized is for a QLoRA run (--quant nf4); this run trained on dense weights")
    torch_device = src.device(device)
    export_dtype = resolve_dtype(dtype if dtype is not None else (src.cfg.dtype or "float32"))
    model = build_export_model(src, torch_device, torch.float32, base)
    inputs = _probe_inputs(model, src.cfg, torch_device, torch.float32)
    part = trained_part(model)
    adapted = _outputs(model, inputs)
    with disable_adapters(part):
        effect = _relative_error(adapted, _outputs(model, inputs))  # how far the adapter moves the output
    layers = len(adapter_modules(part))
    unload(part, merge=True)
    error = _relative_error(adapted, _outputs(model, inputs))
    limit = TOLERANCE
    if not error <= limit:  # also catches NaN
        raise CheckpointError(f"the merged model's output differs from the adapted model's by {error:.3g} (relative, "
                              f"float32; accepted up to {limit:g}): nothing was written")
    model.to(export_dtype)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        part.save_pretrained(str(tmp))
        cfg = src.cfg
        if cfg.model_dir is not None and cfg.task != "diffusion" and has_tokenizer(cfg.model_dir):
            HFTokenizer(cfg.model_dir).tokenizer.save_pretrained(str(tmp))
        record = {"source": str(Path(source).expanduser().absolute()), "base_model": cfg.model_name,
                  "task": cfg.task, "method": src.method, "adapted_layers": layers, "merged_onto": base,
                  "dtype": dtype_name(export_dtype), "check": {"relative_error": error, "tolerance": limit, "adapter_effect": effect}}
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=1), encoding="utf-8")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out, src.method, base, dtype_name(export_dtype), layers, error, effect)
