"""Precomputed diffusion training data: ``slimtune train --task diffusion --data FILE.safetensors``.

The file holds what the denoiser is fed, for N samples, already encoded (by the pipeline's own VAE and text
encoders, outside slimtune — as diffusers' training scripts can cache them):

* UNet (SD-1.5 / SDXL): ``latents`` ``[N, C, H, W]`` (the VAE's latents times its scaling factor),
  ``encoder_hidden_states`` ``[N, T, D]``; SDXL adds ``text_embeds`` ``[N, P]`` and ``time_ids`` ``[N, 6]``;
* DiT (Flux): ``latents`` ``[N, tokens, C]`` (packed 2x2 patches of a square latent), ``encoder_hidden_states``
  ``[N, T, D]``, ``pooled_projections`` ``[N, P]``.

``--data`` may also be a folder of such files (``slimtune encode --shard-rows``: ``part-00000.safetensors``, ...):
their rows, in file-name order, are the data; every file is checked alike. Each file is memory-mapped and read a row
at a time (``safe_open``'s slices): only the header is parsed up front
(keys, shapes, dtypes: everything is checked before training starts), so a file larger than the host's memory
trains. Each training sample takes the next row of a per-epoch permutation of the N rows (:class:`~.order.DataOrder`, by
the sample's position in the run, so ``--resume`` repeats it), and its own noise and timestep (drawn from the run's
seed and the position, as for random samples). Every tensor is checked against the shape the model takes at the
file's latent size (the same inputs :func:`slimtune.models.workload.make_inputs` builds), naming the key.
"""
from __future__ import annotations

import bisect
import itertools
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import DataError
from ..models.diffusion import DiffusionPreset
from ..models.workload import make_inputs
from .order import DataOrder

#: per family: the file's key -> where it goes in the denoiser's inputs (a ``/`` names a nested key)
KEYS = {"unet": {"latents": "sample", "encoder_hidden_states": "encoder_hidden_states",
                 "text_embeds": "added_cond_kwargs/text_embeds", "time_ids": "added_cond_kwargs/time_ids"},
        "dit": {"latents": "hidden_states", "encoder_hidden_states": "encoder_hidden_states",
                "pooled_projections": "pooled_projections"}}


#: safetensors' names of its floating-point dtypes
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


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
    """The rows of a precomputed-latents file (or a folder of them), checked against ``spec``'s denoiser, each read
    when it is used and cast to ``dtype``."""

    def __init__(self, path: str | Path, spec: DiffusionPreset, dtype: torch.dtype, seed: int) -> None:
        self.path, self.spec, self.dtype = Path(path), spec, dtype
        self.files = sorted(self.path.glob("*.safetensors")) if self.path.is_dir() else [self.path]
        if not self.files:
            raise DataError(f"--data {path}: a folder with no .safetensors files in it")
        self._handles: list[Any] = [None] * len(self.files)
        headers = [self._header(index) for index in range(len(self.files))]
        self.resolution = self._resolution(headers[0][0])
        self.template = make_inputs(spec, None, 1, 0, "cpu", dtype, torch.Generator().manual_seed(0),
                                    resolution=self.resolution)
        self.keys = {key: where for key, where in KEYS[spec.family].items() if _get(self.template, where) is not None}
        counts = [self._check(file, *header) for file, header in zip(self.files, headers)]
        self.starts = list(itertools.accumulate(counts[:-1], initial=0))  # each file's first row
        self.rows = sum(counts)
        self.order = DataOrder(self.rows, seed)

    def _header(self, index: int) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
        """``(shapes, dtypes)`` of file ``index``'s tensors, from its header (nothing else is read)."""
        try:
            handle = self._open(index)
            slices = {key: handle.get_slice(key) for key in handle.keys()}
            return ({key: tuple(s.get_shape()) for key, s in slices.items()},
                    {key: s.get_dtype() for key, s in slices.items()})
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise DataError(f"--data {self.files[index]}: not a readable safetensors file ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0]})") from None

    def _check(self, file: Path, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str]) -> int:
        """File ``file``'s row count, after checking its keys, shapes and dtypes against the denoiser's inputs."""
        spec, keys = self.spec, self.keys
        missing = sorted(set(keys) - set(shapes))
        unknown = sorted(set(shapes) - set(keys))
        if missing or unknown:
            raise DataError(f"--data {file}: {spec.name} ({spec.family}) takes the keys {', '.join(sorted(keys))}"
                            + (f"; missing {', '.join(missing)}" if missing else "")
                            + (f"; unknown {', '.join(unknown)}" if unknown else ""))
        rows = {key: shape[0] if shape else 0 for key, shape in shapes.items()}
        if len(set(rows.values())) != 1 or 0 in rows.values():
            raise DataError(f"--data {file}: every tensor needs the same number of rows (first dimension), got "
                            + ", ".join(f"{k} {n}" for k, n in sorted(rows.items())))
        for key, where in keys.items():
            want = tuple(_get(self.template, where).shape[1:])
            if shapes[key][1:] != want:
                raise DataError(f"--data {file}: {key!r} rows are {list(shapes[key][1:])}, but {spec.name} takes "
                                f"{list(want)} at this latent size")
            if dtypes[key] not in FLOAT_DTYPES:
                raise DataError(f"--data {file}: {key!r} must be floating point, got {dtypes[key]}")
        return next(iter(rows.values()))

    def _open(self, index: int) -> Any:
        """File ``index``'s ``safe_open`` handle (memory-mapped), opened on first use in each process."""
        if self._handles[index] is None:
            self._handles[index] = safe_open(str(self.files[index]), framework="pt")
        return self._handles[index]

    def __getstate__(self) -> dict[str, Any]:  # handles do not pickle: a worker process opens its own
        return {**self.__dict__, "_handles": [None] * len(self.files)}

    def __len__(self) -> int:
        return self.rows

    def row(self, key: str, index: int) -> torch.Tensor:
        """Row ``index`` of the data's tensor ``key`` (rows of a folder's files in order), ``[1, ...]`` in the data's
        dtype (read from its file now)."""
        file = bisect.bisect_right(self.starts, index) - 1
        local = index - self.starts[file]
        return self._open(file).get_slice(key)[local:local + 1].to(self.dtype)

    def _resolution(self, shapes: dict[str, tuple[int, ...]]) -> int:
        """The latent side the first file's ``latents`` have (a DiT's: from its packed token count)."""
        latents = shapes.get("latents")
        if latents is None:
            raise DataError(f"--data {self.files[0]}: no 'latents' tensor")
        if self.spec.family == "unet":
            if len(latents) != 4 or latents[2] != latents[3]:
                raise DataError(f"--data {self.files[0]}: UNet 'latents' must be [N, C, H, H] (square), got "
                                f"{list(latents)}")
            return int(latents[2])
        side = math.isqrt(int(latents[1])) if len(latents) == 3 else 0
        if len(latents) != 3 or side * side != latents[1]:
            raise DataError(f"--data {self.files[0]}: DiT 'latents' must be [N, tokens, C] with a square token count "
                            f"(packed 2x2 patches), got {list(latents)}")
        return 2 * side

    def inputs(self, position: int, generator: torch.Generator) -> dict[str, Any]:
        """The denoiser's inputs for the sample at ``position`` of the run: its row's tensors; the rest (timestep,
        ids) drawn as for a random sample with ``generator``."""
        row = self.order.take(position, 1)[0]
        inputs = make_inputs(self.spec, None, 1, 0, "cpu", self.dtype, generator, resolution=self.resolution)
        for key, where in self.keys.items():
            _put(inputs, where, self.row(key, row))
        return inputs
