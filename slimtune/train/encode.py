"""Images and captions -> the latents file ``slimtune train --task diffusion --data`` reads (``slimtune encode``).

A diffusion run trains the denoiser alone; its inputs are what the pipeline's frozen VAE and text encoders make of an
image and its caption. This module runs those once, with the user's own local diffusers pipeline directory
(``model_index.json``, ``vae/``, ``text_encoder/``, ``tokenizer/``; SDXL adds ``text_encoder_2/`` and
``tokenizer_2/``), and writes the keys :mod:`.latents` documents:

* ``latents`` ``[N, C, H, H]``: the VAE posterior's mean (deterministic: encoding twice gives the same file) times
  the VAE's ``scaling_factor`` (after subtracting its ``shift_factor`` where it has one), as diffusers' training
  scripts scale them;
* ``encoder_hidden_states`` ``[N, T, D]``: SD-1.5 style, the text encoder's last hidden state; SDXL style, the
  second-to-last hidden states of both encoders side by side (``D = 768 + 1280``), as diffusers' SDXL pipeline
  builds them;
* SDXL only: ``text_embeds`` ``[N, P]`` (the second encoder's projected pooled output) and ``time_ids`` ``[N, 6]``
  (original height and width, crop top and left, target height and width);
* Flux (``FluxPipeline`` directories: CLIP as ``text_encoder``, T5 as ``text_encoder_2``): ``latents`` packed in 2x2
  patches ``[N, (H/2)², 4C]`` as ``FluxPipeline`` packs them, ``encoder_hidden_states`` the T5 encoder's last hidden
  state over ``text_len`` tokens (default: its tokenizer's ``model_max_length``, at most 512, FLUX.1-dev's), and
  ``pooled_projections`` CLIP's pooled output.

Captions are tokenized to the tokenizer's ``model_max_length`` (77 for CLIP), padded and truncated, as the
pipelines do. Images are converted to RGB, resized so their shorter side is ``resolution`` (bicubic) and
centre-cropped to a square: the file's latents are square, as training takes them.

Samples come from a folder — every image file under it (sorted by path) with its caption in a ``.txt`` file of the
same name beside it (the layout kohya-style trainers use) — or from a JSONL file of ``{"image": path, "text":
caption}`` objects (paths relative to the JSONL file).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import save_file

from ..errors import ConfigError, DataError, MissingDependencyError
from ..models.deps import require_diffusers, require_transformers

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclasses.dataclass(frozen=True)
class Sample:
    """One training sample: an image file and its caption."""

    image: Path
    caption: str


def read_samples(source: str | Path) -> list[Sample]:
    """The samples of a folder (images with ``.txt`` captions beside them) or of a JSONL file (``{"image",
    "text"}``); a missing caption, a missing image or a malformed line is a :class:`DataError` naming it."""
    source = Path(source)
    if source.is_dir():
        images = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            raise DataError(f"--data {source}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        missing = [str(p.relative_to(source)) for p in images if not p.with_suffix(".txt").is_file()]
        if missing:
            raise DataError(f"--data {source}: {len(missing)} image(s) without a caption file beside them (same name, "
                            f".txt), e.g. {', '.join(missing[:3])}")
        return [Sample(p, p.with_suffix(".txt").read_text(encoding="utf-8").strip()) for p in images]
    if not source.is_file():
        raise DataError(f"--data {source}: no such folder or file")
    samples = []
    for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            image, caption = record["image"], record["text"]
        except (ValueError, TypeError, KeyError) as exc:
            raise DataError(f"--data {source}, line {number}: expected a JSON object with \"image\" and \"text\" "
                            f"({type(exc).__name__}: {exc})") from None
        if not isinstance(image, str) or not isinstance(caption, str):
            raise DataError(f"--data {source}, line {number}: \"image\" and \"text\" must be strings")
        path = (source.parent / image) if not Path(image).is_absolute() else Path(image)
        if not path.is_file():
            raise DataError(f"--data {source}, line {number}: no image file {path}")
        samples.append(Sample(path, caption))
    if not samples:
        raise DataError(f"--data {source}: no samples")
    return samples


def load_image(path: Path, resolution: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """``path`` as a ``[3, resolution, resolution]`` float32 tensor in ``[-1, 1]`` (shorter side resized to
    ``resolution``, bicubic, then centre-cropped), with ``(original height, original width, crop top, crop left)``
    (the crop in resized pixels, as SDXL's ``time_ids`` take it)."""
    try:
        from PIL import Image
    except ImportError:
        raise MissingDependencyError("slimtune encode reads images with Pillow: pip install 'slimtune[diffusion]'") from None
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None
    width, height = image.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1.0, (height, width, top, left)


#: each pipeline style's denoiser folder and its second text encoder's class (None: it has one encoder)
STYLES = {"sd": ("unet", None), "sdxl": ("unet", "CLIPTextModelWithProjection"),
          "flux": ("transformer", "T5EncoderModel")}
#: the latent side Flux pipelines default to (``FluxPipeline.default_sample_size``; its transformer's config has none)
FLUX_SAMPLE_SIZE = 128


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        raise ConfigError(f"--pipeline {path.parent}: no {path.name} ({what})") from None
    except ValueError as exc:
        raise ConfigError(f"--pipeline {path}: not valid JSON ({exc})") from None


@dataclasses.dataclass
class EncoderPipeline:
    """The frozen parts of a local diffusers pipeline that make a training sample: VAE, tokenizers, text encoders.
    ``style``: ``"sd"`` (one CLIP encoder), ``"sdxl"`` (two CLIP encoders), ``"flux"`` (CLIP for the pooled
    embedding, T5 for the token features; latents packed in 2x2 patches)."""

    style: str
    vae: Any
    tokenizers: list[Any]
    text_encoders: list[Any]
    sample_size: int | None  #: the denoiser's latent side by default (its config's ``sample_size``), if known
    text_len: int  #: T5 tokens per caption (Flux); CLIP's are its tokenizer's ``model_max_length``

    @classmethod
    def load(cls, directory: str | Path, device: torch.device, dtype: torch.dtype,
             text_len: int | None = None) -> EncoderPipeline:
        directory = Path(directory)
        index = _read_json(directory / "model_index.json", "a local diffusers pipeline directory has one")
        name = str(index.get("_class_name", ""))
        style = "flux" if "Flux" in name else "sdxl" if (directory / "text_encoder_2").is_dir() else "sd"
        if "transformer" in index and style != "flux":
            raise ConfigError(f"--pipeline {directory}: {name or 'this pipeline'} has a transformer denoiser that "
                              "slimtune encode does not know; SD-1.5, SDXL and Flux style pipelines are supported")
        denoiser, second = STYLES[style]
        parts = ["vae", "text_encoder", "tokenizer"] + (["text_encoder_2", "tokenizer_2"] if second else [])
        for part in parts:
            if not (directory / part).is_dir():
                raise ConfigError(f"--pipeline {directory}: no {part}/ folder ({name or style} style)")
        diffusers, transformers = require_diffusers(), require_transformers()
        vae = diffusers.AutoencoderKL.from_pretrained(directory / "vae", torch_dtype=dtype).to(device).eval()
        tokenizers = [transformers.AutoTokenizer.from_pretrained(directory / "tokenizer")]
        encoders = [transformers.CLIPTextModel.from_pretrained(directory / "text_encoder", torch_dtype=dtype)]
        if second:
            tokenizers.append(transformers.AutoTokenizer.from_pretrained(directory / "tokenizer_2"))
            encoders.append(getattr(transformers, second).from_pretrained(directory / "text_encoder_2",
                                                                          torch_dtype=dtype))
        config_path = directory / denoiser / "config.json"
        sample_size = _read_json(config_path, "").get("sample_size") if config_path.is_file() else None
        if style == "flux" and not isinstance(sample_size, int):
            sample_size = FLUX_SAMPLE_SIZE
        if text_len is None:
            text_len = min(int(tokenizers[-1].model_max_length), 512)
        if text_len < 1:
            raise ConfigError(f"--text-len must be at least 1, got {text_len}")
        return cls(style, vae, tokenizers, [e.to(device).eval() for e in encoders],
                   sample_size if isinstance(sample_size, int) else None, text_len)

    @property
    def vae_scale(self) -> int:
        """Image pixels per latent pixel."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def pixel_multiple(self) -> int:
        """What the image side must be a multiple of: the VAE's factor (twice it for Flux's 2x2 packing)."""
        return self.vae_scale * (2 if self.style == "flux" else 1)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, H]`` in ``[-1, 1]`` -> scaled latents (the posterior's mean): ``[B, C, H/f, H/f]``, or for
        Flux packed in 2x2 patches, ``[B, (H/2f)², 4C]``."""
        param = next(self.vae.parameters())
        latents = self.vae.encode(pixels.to(param.device, param.dtype)).latent_dist.mode()
        shift = getattr(self.vae.config, "shift_factor", None)
        if shift is not None:
            latents = latents - shift
        latents = latents * self.vae.config.scaling_factor
        if self.style == "flux":
            b, c, h, w = latents.shape
            latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, 4 * c)
        return latents

    def _run(self, which: int, captions: Sequence[str], max_length: int, hidden_states: bool = False) -> Any:
        tokenizer, encoder = self.tokenizers[which], self.text_encoders[which]
        ids = tokenizer(list(captions), padding="max_length", max_length=max_length, truncation=True,
                        return_tensors="pt").input_ids
        return encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=hidden_states)

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """The captions' conditioning: ``encoder_hidden_states`` ``[B, T, D]``, plus SDXL's ``text_embeds`` or
        Flux's ``pooled_projections`` ``[B, P]``."""
        clip_len = self.tokenizers[0].model_max_length
        if self.style == "sd":
            return {"encoder_hidden_states": self._run(0, captions, clip_len).last_hidden_state}
        if self.style == "flux":
            return {"encoder_hidden_states": self._run(1, captions, self.text_len).last_hidden_state,
                    "pooled_projections": self._run(0, captions, clip_len).pooler_output}
        first = self._run(0, captions, clip_len, hidden_states=True)
        second = self._run(1, captions, self.tokenizers[1].model_max_length, hidden_states=True)
        return {"encoder_hidden_states": torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1),
                "text_embeds": second.text_embeds}


@dataclasses.dataclass(frozen=True)
class EncodeResult:
    out: Path
    samples: int
    shapes: dict[str, list[int]]


def encode_dataset(pipeline_dir: str | Path, data: str | Path, out: str | Path, *, resolution: int | None = None,
                   batch_size: int = 8, device: str | None = None, dtype: str = "float32",
                   text_len: int | None = None, shard_rows: int | None = None,
                   on_batch: Callable[[int, int], None] | None = None) -> EncodeResult:
    """Encode every sample of ``data`` (:func:`read_samples`) with the pipeline at ``pipeline_dir`` and write the
    latents file to ``out`` (see the module docstring). ``resolution``: the image side in pixels (default: the
    pipeline UNet's ``sample_size`` times the VAE's factor). ``shard_rows``: write ``out`` as a new folder of files
    of that many samples each (``part-00000.safetensors``, ...), holding one file's rows in memory at a time
    instead of all of them; ``train --data`` takes the folder. ``on_batch(done, total)`` is called after each
    batch. The files are written in ``dtype``."""
    if batch_size < 1:
        raise ConfigError(f"--batch must be at least 1, got {batch_size}")
    if shard_rows is not None and shard_rows < 1:
        raise ConfigError(f"--shard-rows must be at least 1, got {shard_rows}")
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise ConfigError(f"--dtype {dtype!r} is not a floating-point torch dtype (float32, bfloat16, float16)")
    samples = read_samples(data)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipeline = EncoderPipeline.load(pipeline_dir, target, torch_dtype, text_len)
    side = resolution
    if side is None and pipeline.sample_size:
        side = pipeline.sample_size * pipeline.vae_scale
    if side is None:
        raise ConfigError(f"--pipeline {pipeline_dir}: its denoiser's config.json gives no sample size to take the "
                          "image size from; pass --resolution")
    if side <= 0 or side % pipeline.pixel_multiple:
        raise ConfigError(f"--resolution {side}: must be a positive multiple of {pipeline.pixel_multiple} (the VAE's "
                          f"factor{', twice: Flux packs 2x2 latent patches' if pipeline.style == 'flux' else ''})")
    out = Path(out)
    shard = shard_rows or len(samples)
    if shard_rows is None:
        paths = [out]
        out.parent.mkdir(parents=True, exist_ok=True)
    else:
        if out.is_file() or (out.is_dir() and any(out.glob("*.safetensors"))):
            raise ConfigError(f"--out {out}: with --shard-rows it is a folder of latents files, and this one exists "
                              "with latents in it (train --data would read them too): give a new or empty folder")
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / f"part-{i:05d}.safetensors" for i in range(-(-len(samples) // shard))]
    metadata = {"pipeline": str(pipeline_dir), "style": pipeline.style, "resolution": str(side)}
    shapes: dict[str, list[int]] = {}
    for path, first in zip(paths, range(0, len(samples), shard)):
        part = samples[first:first + shard]
        tensors: dict[str, torch.Tensor] = {}  # each [rows, ...], filled batch by batch: one copy of a part in memory
        for start in range(0, len(part), batch_size):
            batch = part[start:start + batch_size]
            for key, value in _encode_batch(pipeline, batch, side).items():
                if key not in tensors:
                    tensors[key] = torch.empty((len(part), *value.shape[1:]), dtype=torch_dtype)
                tensors[key][start:start + len(batch)].copy_(value)
            if on_batch is not None:
                on_batch(first + start + len(batch), len(samples))
        save_file(tensors, str(path), metadata={**metadata, "samples": str(len(part))})
        shapes = {key: [len(samples), *t.shape[1:]] for key, t in tensors.items()}
    return EncodeResult(out, len(samples), shapes)


def _encode_batch(pipeline: EncoderPipeline, batch: Sequence[Sample], side: int) -> dict[str, torch.Tensor]:
    """The file's rows for ``batch``: its images' latents and its captions' encodings (SDXL: its time ids too)."""
    loaded = [load_image(s.image, side) for s in batch]
    pixels = torch.stack([p for p, _ in loaded])
    rows = {"latents": pipeline.encode_images(pixels), **pipeline.encode_text([s.caption for s in batch])}
    if pipeline.style == "sdxl":
        rows["time_ids"] = torch.tensor([[h, w, top, left, side, side] for _, (h, w, top, left) in loaded],
                                        dtype=torch.float32)
    return rows
