"""Diffusion presets: a UNet or a DiT denoiser (diffusers) plus frozen CLIP text encoders, random weights.

Configurations only — nothing is downloaded. Each preset keeps the diffusers / transformers constructor
arguments of the published model's ``config.json`` (the arguments that differ from the class defaults):

* ``stable-diffusion-1.5``: ``UNet2DConditionModel`` (859,520,964 parameters) + CLIP ViT-L/14 text encoder
  (``CLIPTextModel``, 123,060,480 parameters).
* ``sdxl``: SDXL-base-1.0's UNet (2,567,463,684 parameters) + its two text encoders (CLIP ViT-L/14, and
  OpenCLIP ViT-bigG/14 as ``CLIPTextModelWithProjection``, 694,659,840 parameters).
* ``flux-dit``: FLUX.1-dev's ``FluxTransformer2DModel`` (19 double + 38 single blocks, 24 heads x 128,
  ``guidance_embeds=True``; 11,901,408,320 parameters), no text encoders (T5-XXL's conditioning is random).
* ``flux-dit-4b``: FLUX.2-klein-4B's size in FLUX.1's block layout (5 double + 15 single blocks, 24 heads x 128,
  128 latent channels, 7680-wide text conditioning, no guidance embedding; 3,888,332,160 parameters, klein's
  ``Flux2Transformer2DModel`` has 3,875,544,576), no text encoders.
* ``tiny-unet`` / ``tiny-dit`` / ``tiny-dit-4b``: the same classes a few hundred thousand parameters large, for CPU
  tests.

:func:`build_diffusion_model` returns a :class:`DiffusionModel`: the denoiser as ``.unet`` (UNets) or
``.transformer`` (DiTs), as in diffusers pipelines, and the text encoders as ``.text_encoder`` /
``.text_encoder_2``. The text encoders are frozen (``requires_grad=False``) and held only so that their
weights count, as in a training script that keeps them on the GPU; they are not run — the conditioning
tensors of :func:`slimtune.models.workload.make_inputs` are random, of the shapes they would produce.
No VAE is built (latents are random too).

This module imports diffusers / transformers only when a model is built.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable

import torch
import torch.utils.checkpoint
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import ConfigError
from .deps import require_diffusers, require_transformers

#: LoRA targets of a diffusers UNet or DiT: the attention projections (self- and cross-attention), the
#: Transformer2DModel's proj_in/proj_out and the feed-forward GEGLU/out Linears (diffusers' and LyCORIS'
#: "attention" set).
UNET_ATTENTION_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
                                          "ff.net.0.proj", "ff.net.2")
#: Added for the convolution-capable methods (LoCon, LoHa, LoKr, DoRA on convs), LyCORIS' default preset
#: (every Linear/Conv2d in Transformer2DModel, ResnetBlock2D, Downsample2D, Upsample2D): the ResNet convs, the
#: ResNet time-embedding projection, and the down/upsampler convs (``downsamplers.0.conv``,
#: ``upsamplers.0.conv``, matched by the suffix ``conv``).
UNET_CONV_TARGETS: tuple[str, ...] = ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv")
#: Flux's attention, context and MLP Linears (diffusers' Flux DreamBooth LoRA set, plus the single blocks'
#: ``proj_mlp`` / ``proj_out``).
FLUX_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                                 "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                                 "ff_context.net.2", "proj_mlp", "proj_out")


def _freeze(d: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(d.items())


@dataclasses.dataclass(frozen=True)
class DiffusionPreset:
    """A diffusion denoiser's shape (constructor arguments) and its frozen text encoders.

    ``family``: ``"unet"`` (``UNet2DConditionModel``) or ``"dit"`` (``FluxTransformer2DModel``).
    ``denoiser``: the denoiser's constructor keyword arguments, as ``(name, value)`` pairs.
    ``text_encoders``: per encoder ``(class name, CLIPTextConfig keyword arguments as pairs)``.
    ``text_len``: conditioning tokens (77 for CLIP; 512 for FLUX.1-dev's T5).
    """

    name: str
    description: str
    family: str
    denoiser: tuple[tuple[str, Any], ...]
    text_encoders: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    text_len: int = 77

    # -- the shape ------------------------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """The denoiser's constructor arguments (a fresh dict)."""
        return dict(self.denoiser)

    @property
    def targets(self) -> tuple[str, ...]:
        """LoRA's default targets (see :func:`slimtune.models.workload.default_targets` for other methods)."""
        return FLUX_TARGETS if self.family == "dit" else UNET_ATTENTION_TARGETS

    @property
    def sample_size(self) -> int:
        """Latent side length: the UNet's ``sample_size``; for a DiT the latent side (in pixels/8) it trains at."""
        return int(self.config.get("sample_size", 128))

    @property
    def in_channels(self) -> int:
        return int(self.config.get("in_channels", 64 if self.family == "dit" else 4))

    @property
    def cross_attention_dim(self) -> int:
        """Width of ``encoder_hidden_states`` (UNet ``cross_attention_dim``, DiT ``joint_attention_dim``)."""
        c = self.config
        return int(c.get("joint_attention_dim", 4096) if self.family == "dit" else c.get("cross_attention_dim", 1280))

    def dit_config(self) -> dict[str, Any]:
        """The DiT's constructor arguments without ``sample_size`` (not a Flux argument)."""
        return {k: v for k, v in self.config.items() if k != "sample_size"}

    def num_parameters(self, text_encoders: bool = True) -> int:
        """Parameters of the denoiser (plus the text encoders), counted on the meta device (no allocation)."""
        with torch.device("meta"):
            model = build_parts(self, text_encoders=text_encoders)
        return sum(p.numel() for p in model.parameters())


def _clip(hidden: int, layers: int, heads: int, intermediate: int, **extra: Any) -> tuple[tuple[str, Any], ...]:
    return _freeze(dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=intermediate, vocab_size=49408, max_position_embeddings=77, **extra))


#: CLIP ViT-L/14's text tower (SD-1.x, SDXL's first encoder): quick_gelu, as in its config.json.
CLIP_L = ("CLIPTextModel", _clip(768, 12, 12, 3072, hidden_act="quick_gelu", projection_dim=768))
#: OpenCLIP ViT-bigG/14's text tower with its projection (SDXL's second encoder).
CLIP_BIGG = ("CLIPTextModelWithProjection", _clip(1280, 32, 20, 5120, hidden_act="gelu", projection_dim=1280))

#: Stable Diffusion 1.5's UNet (``UNet2DConditionModel`` arguments); ``tiny-sd15`` is its layout at tiny widths
_SD15_UNET: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))

DIFFUSION_PRESETS: dict[str, DiffusionPreset] = {p.name: p for p in (
    DiffusionPreset(
        "tiny-unet", "a tiny SD-style UNet (2 levels, cross-attention) for CPU tests", "unet",
        _freeze(dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                     attention_head_dim=8, norm_num_groups=8)),
        text_len=8),
    DiffusionPreset(
        "tiny-sd15", "stable-diffusion-1.5's layout (4 levels, 2 ResNets per level, 16 transformer blocks) at tiny "
        "widths: a CPU proxy for an SD-1.5 step's host cost", "unet",
        _freeze(dict(_SD15_UNET, sample_size=8, block_out_channels=(32, 32, 64, 64), cross_attention_dim=32,
                     norm_num_groups=8)),
        text_len=8),
    DiffusionPreset(
        "tiny-dit", "a tiny Flux-style DiT (1 double + 1 single block) for CPU tests", "dit",
        _freeze(dict(sample_size=8, patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                     attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                     pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))),
        text_len=8),
    DiffusionPreset(
        "stable-diffusion-1.5", "Stable Diffusion 1.5 UNet (859.5M) + CLIP-L text encoder (frozen, 123.1M)", "unet",
        _freeze(_SD15_UNET),
        text_encoders=(CLIP_L,)),
    DiffusionPreset(
        "sdxl", "SDXL-base-1.0 UNet (2.57B) + CLIP-L and OpenCLIP-bigG text encoders (frozen, 817.7M)", "unet",
        _freeze(dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
                     layers_per_block=2, transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
                     attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
                     addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))),
        text_encoders=(CLIP_L, CLIP_BIGG)),
    DiffusionPreset(
        "flux-dit", "FLUX.1-dev-shaped DiT (11.9B; 19 double + 38 single blocks), 1024px (64x64 latent tokens)",
        "dit",
        _freeze(dict(sample_size=128, patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                     attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                     pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))),
        text_len=512),
    DiffusionPreset(
        "flux-dit-4b", "FLUX.2-klein-4B-sized DiT (3.89B; 5 double + 15 single FLUX.1 blocks, no guidance embedding), "
        "1024px", "dit",
        _freeze(dict(sample_size=128, patch_size=1, in_channels=128, num_layers=5, num_single_layers=15,
                     attention_head_dim=128, num_attention_heads=24, joint_attention_dim=7680,
                     pooled_projection_dim=768, guidance_embeds=False, axes_dims_rope=(16, 56, 56))),
        text_len=512),
    DiffusionPreset(
        "tiny-dit-4b", "flux-dit-4b's layout (more single than double blocks, no guidance) tiny, for CPU tests", "dit",
        _freeze(dict(sample_size=8, patch_size=1, in_channels=32, num_layers=1, num_single_layers=3,
                     attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                     pooled_projection_dim=16, guidance_embeds=False, axes_dims_rope=(4, 6, 6))),
        text_len=8),
)}


#: where a diffusers pipeline directory keeps its denoiser
DENOISER_FOLDERS = ("unet", "transformer")


def denoiser_directory(model_dir: str) -> str:
    """``model_dir`` itself, or — for a diffusers pipeline directory (``model_index.json``, no ``config.json``) —
    its ``unet/`` or ``transformer/`` folder (the same directory ``slimtune encode --pipeline`` takes)."""
    root = Path(model_dir)
    if (root / "config.json").is_file() or not (root / "model_index.json").is_file():
        return model_dir
    for folder in DENOISER_FOLDERS:
        if (root / folder / "config.json").is_file():
            return str(root / folder)
    raise ConfigError(f"--model {model_dir}: a diffusers pipeline directory without a "
                      f"{' or '.join(DENOISER_FOLDERS)}/config.json")


class DiffusionModel(nn.Module):
    """A denoiser plus frozen text encoders. ``forward(**inputs)`` runs the denoiser alone and returns its
    prediction (``[B, C, H, W]`` for a UNet, ``[B, tokens, C]`` for a DiT); the text encoders are never run."""

    def __init__(self, family: str, denoiser: nn.Module, text_encoders: list[nn.Module]) -> None:
        super().__init__()
        self.family = family
        setattr(self, "transformer" if family == "dit" else "unet", denoiser)
        for i, encoder in enumerate(text_encoders):
            encoder.requires_grad_(False)
            setattr(self, "text_encoder" if i == 0 else f"text_encoder_{i + 1}", encoder)

    @property
    def denoiser(self) -> nn.Module:
        return self.transformer if self.family == "dit" else self.unet

    def forward(self, **inputs: Any) -> torch.Tensor:
        return self.denoiser(**inputs, return_dict=False)[0]

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """diffusers' checkpointing of the denoiser's ResNet / transformer blocks (non-reentrant;
        ``gradient_checkpointing_kwargs`` go to ``torch.utils.checkpoint.checkpoint``)."""
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        self.denoiser.enable_gradient_checkpointing(functools.partial(torch.utils.checkpoint.checkpoint, **kwargs))

    def enable_input_require_grads(self) -> None:
        """Nothing to do: non-reentrant checkpointing needs no input that requires grad."""


def build_parts(spec: DiffusionPreset, text_encoders: bool = True) -> DiffusionModel:
    """The model on the current default device, float32, with diffusers' / transformers' own initialisation."""
    diffusers = require_diffusers()
    if spec.family == "dit":
        denoiser = diffusers.FluxTransformer2DModel(**spec.dit_config())
    else:
        denoiser = diffusers.UNet2DConditionModel(**spec.config)
    encoders: list[nn.Module] = []
    if text_encoders and spec.text_encoders:
        transformers = require_transformers()
        for class_name, kwargs in spec.text_encoders:
            encoders.append(getattr(transformers, class_name)(transformers.CLIPTextConfig(**dict(kwargs))))
    return DiffusionModel(spec.family, denoiser, encoders)


def build_diffusion_model(spec: DiffusionPreset, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32, seed: int = 0) -> DiffusionModel:
    """A randomly initialised :class:`DiffusionModel`: seeded, built on ``device``, then cast to ``dtype``."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = build_parts(spec).to(dtype)
    return model


def latent_tokens(spec: DiffusionPreset, resolution: int | None = None) -> int:
    """Image tokens of a DiT at latent side ``resolution`` (default: the preset's): ``(res / 2)²`` (2x2 packing)."""
    res = resolution or spec.sample_size
    return (res // 2) ** 2


def unet_resolution_ok(spec: DiffusionPreset, resolution: int) -> bool:
    """Whether a UNet can take latents of side ``resolution`` (divisible by 2^(levels-1))."""
    levels = len(spec.config.get("block_out_channels", (1,)))
    return resolution > 0 and resolution % (2 ** (levels - 1)) == 0


#: SDPA backends a DiT's training step uses on CUDA: PyTorch's choice less cuDNN attention. On an H200 with
#: torch 2.11 (cuDNN attention picked by default there), cuDNN attention's backward on the ``flux-dit-4b`` shape
#: (joint attention over 4,608 tokens, head dim 128) failed — an illegal memory access, or ``mha_graph.execute``
#: not good — for PEFT, slimtune and the plain full fine-tune alike; with it excluded the same steps ran
#: (benchmarks/RESULTS.md, runs 40-43). Flash attention takes these shapes.
DIT_SDPA_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def training_attention(model: nn.Module, device: str | torch.device
                       ) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the context each training step of ``model`` — forward *and* backward, where checkpointed
    blocks run again — runs in (``with factory(): ...``, a new one per step): for a DiT (a
    :class:`DiffusionModel` of family ``"dit"``, or one inside ``model``) on CUDA, ``torch.nn.attention.
    sdpa_kernel`` without cuDNN attention (:data:`DIT_SDPA_BACKENDS`); otherwise nothing."""
    if torch.device(device).type == "cuda" and any(isinstance(m, DiffusionModel) and m.family == "dit"
                                                   for m in model.modules()):
        return functools.partial(sdpa_kernel, list(DIT_SDPA_BACKENDS))
    return contextlib.nullcontext
