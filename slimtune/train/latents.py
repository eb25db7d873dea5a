"""Precomputed diffusion training data: ``slimtune train --task diffusion --data FILE.safetensors``.

The file holds what the denoiser is fed, for N samples, already encoded (by the pipeline's own VAE and text
encoders, outside slimtune — as diffusers' training scripts can cache them):

* UNet (SD-1.5 / SDXL): ``latents`` ``[N, C, H, W]`` (the VAE's latents times its scaling factor),
  ``encoder_hidden_states`` ``[N, T, D]``; SDXL adds ``text_embeds`` ``[N, P]`` and ``time_ids`` ``[N, 6]``;
* DiT (Flux): ``latents`` ``[N, tokens, C]`` (packed 2x2 patches of a square latent), ``encoder_hidden_states``
  ``[N, T, D]``, ``pooled_projections`` ``[N, P]``.

Each training sample takes the next row of a per-epoch permutation of the N rows (:class:`~.order.DataOrder`, by
the sample's position in the run, so ``--resume`` repeats it), and its own noise and timestep (drawn from the run's
seed and the position, as for random samples). Every tensor is checked against the shape the model takes at the
file's latent size (the same inputs :func:`slimtune.models.workload.make_inputs` builds), naming the key.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..errors import DataError
from ..models.diffusion import DiffusionPreset
from ..models.workload import make_inputs
from .order import DataOrder

#: per family: the file's key -> where it goes in the denoiser's inputs (a ``/`` names a nested key)
KEYS = {"unet": {"latents": "sample", "encoder_hidden_states": "encoder_hidden_states",
                 "text_embeds": "added_cond_kwargs/text_embeds", "time_ids": "added_cond_kwargs/time_ids"},
        "dit": {"latents": "hidden_states", "encoder_hidden_states": "encoder_hidden_states",
                "pooled_projections": "pooled_projections"}}


def _get(inputs: dict[str, Any], where: str) -> torch.Tensor | None:
    node: Any = inputs
    for part in where.split("/"):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _put(inputs: dict[str, Any], where: str, value: torch.Tensor) -> None:
    *parents, last = where.split("/")
    node = inputs
    for part in parents:
        node = node[part]
    node[last] = value


class LatentData:
    """The rows of a precomputed-latents file, checked against ``spec``'s denoiser, in ``dtype``."""

    def __init__(self, path: str | Path, spec: DiffusionPreset, dtype: torch.dtype, seed: int) -> None:
        self.path, self.spec, self.dtype = Path(path), spec, dtype
        try:
            tensors = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise DataError(f"--data {path}: not a readable safetensors file ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0]})") from None
        self.resolution = self._resolution(tensors)
        self.template = make_inputs(spec, None, 1, 0, "cpu", dtype, torch.Generator().manual_seed(0),
                                    resolution=self.resolution)
        keys = {key: where for key, where in KEYS[spec.family].items() if _get(self.template, where) is not None}
        missing = sorted(set(keys) - set(tensors))
        unknown = sorted(set(tensors) - set(keys))
        if missing or unknown:
            raise DataError(f"--data {path}: {spec.name} ({spec.family}) takes the keys {', '.join(sorted(keys))}"
                            + (f"; missing {', '.join(missing)}" if missing else "")
                            + (f"; unknown {', '.join(unknown)}" if unknown else ""))
        rows = {key: t.shape[0] if t.dim() else 0 for key, t in tensors.items()}
        if len(set(rows.values())) != 1 or 0 in rows.values():
            raise DataError(f"--data {path}: every tensor needs the same number of rows (first dimension), got "
                            + ", ".join(f"{k} {n}" for k, n in sorted(rows.items())))
        for key, where in keys.items():
            want = tuple(_get(self.template, where).shape[1:])
            got = tuple(tensors[key].shape[1:])
            if got != want:
                raise DataError(f"--data {path}: {key!r} rows are {list(got)}, but {spec.name} takes {list(want)} "
                                f"at this latent size")
            if not tensors[key].is_floating_point():
                raise DataError(f"--data {path}: {key!r} must be floating point, got {tensors[key].dtype}")
        self.tensors = {key: tensors[key].to(dtype) for key in keys}
        self.keys = keys
        self.order = DataOrder(len(self), seed)

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def _resolution(self, tensors: dict[str, torch.Tensor]) -> int:
        """The latent side the file's ``latents`` have (a DiT's: from its packed token count)."""
        latents = tensors.get("latents")
        if latents is None:
            raise DataError(f"--data {self.path}: no 'latents' tensor")
        if self.spec.family == "unet":
            if latents.dim() != 4 or latents.shape[2] != latents.shape[3]:
                raise DataError(f"--data {self.path}: UNet 'latents' must be [N, C, H, H] (square), got "
                                f"{list(latents.shape)}")
            return int(latents.shape[2])
        side = math.isqrt(int(latents.shape[1])) if latents.dim() == 3 else 0
        if latents.dim() != 3 or side * side != latents.shape[1]:
            raise DataError(f"--data {self.path}: DiT 'latents' must be [N, tokens, C] with a square token count "
                            f"(packed 2x2 patches), got {list(latents.shape)}")
        return 2 * side

    def inputs(self, position: int, generator: torch.Generator) -> dict[str, Any]:
        """The denoiser's inputs for the sample at ``position`` of the run: its row's tensors; the rest (timestep,
        ids) drawn as for a random sample with ``generator``."""
        row = self.order.take(position, 1)[0]
        inputs = make_inputs(self.spec, None, 1, 0, "cpu", self.dtype, generator, resolution=self.resolution)
        for key, where in self.keys.items():
            _put(inputs, where, self.tensors[key][row:row + 1])
        return inputs
