"""One training step's workload for any preset: the model, its inputs, its loss, its adapter targets.

Profile code stays preset-agnostic by going through these functions::

    model = build_model(preset, device, dtype, seed)
    model = adapt(model, make_adapter_config(method, rank, alpha, default_targets(preset, method)))
    if grad_checkpointing:
        enable_gradient_checkpointing(preset, model, adapted=method != "none")
    inputs = make_inputs(preset, model, batch, seq, device, dtype, generator)   # once, reused every step
    loss = training_loss(preset, model, inputs)                                  # forward + loss, every step
    loss.backward()

Language models (Llama, OPT): ``input_ids`` / ``labels`` ``[batch, seq]`` (the same tensor, as the PEFT baseline
protocol passes it) and transformers' causal-LM loss. Diffusion models (:mod:`.diffusion`): random latents,
timesteps and conditioning of the shapes the real pipeline feeds the denoiser, and the MSE (in float32, as
diffusers' training scripts take it) between the prediction and a random target of the prediction's shape —
the cost of a training step does not depend on the values. For diffusion presets ``seq`` is ignored; the
latent side is ``resolution`` (default: the preset's ``sample_size``).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import ALL_LINEAR
from ..errors import ConfigError
from ..methods.hra import HraConfig
from ..methods.loha import LohaConfig
from ..methods.lokr import LokrConfig
from ..methods.lora import LoraConfig
from .diffusion import UNET_ATTENTION_TARGETS, UNET_CONV_TARGETS, DiffusionPreset, latent_tokens, unet_resolution_ok
from .presets import ModelPreset, Preset, build_model, get_preset, resolve_dtype

__all__ = ["CONV_METHODS", "DORA_RECOMPUTE", "METHODS", "TOKEN_HIGH", "build_model", "default_targets",
           "enable_gradient_checkpointing",
           "forward_loss", "make_adapter_config", "make_inputs", "sample_tokens", "training_loss"]

#: Token ids are drawn from ``[0, min(vocab, TOKEN_HIGH))``, as the PEFT baseline protocol draws them.
TOKEN_HIGH = 128000
#: Adapter methods (``"none"``: full fine-tune of the LM / denoiser; text encoders stay frozen).
#: ``"locon"`` is LoRA with the convolutions added to its targets (LyCORIS' LoCon).
METHODS = ("lora", "locon", "dora", "dora-recompute", "dora-recompute-unshared", "hra", "loha", "lokr", "none")
#: ``dora_recompute`` per DoRA method: "dora-recompute-unshared" recomputes z only in the layers whose output the
#: next op does not save anyway (Llama-style q/k/o/down projections; see LoraConfig.dora_recompute)
DORA_RECOMPUTE = {"dora": "auto", "dora-recompute": True,
                  "dora-recompute-unshared": ["q_proj", "k_proj", "o_proj", "down_proj"]}
#: Methods that also adapt a UNet's convolutions by default (LyCORIS' practice).
CONV_METHODS = ("locon", "loha", "lokr")


def _spec(preset: str | Preset) -> Preset:
    return get_preset(preset)


# -- adapters ---------------------------------------------------------------------------------------
def default_targets(preset: str | Preset, method: str) -> str | list[str]:
    """The module-name suffixes ``method`` adapts by default on ``preset`` (``"all-linear"`` for a model directory's
    preset, :func:`~slimtune.models.presets.preset_from_dir`).

    Llama: the seven projections (q/k/v/o, gate/up/down) for every method; OPT: ``q_proj``, ``v_proj``.
    UNet: attention and feed-forward Linears plus the Transformer2DModel's ``proj_in``/``proj_out``
    (:data:`~slimtune.models.diffusion.UNET_ATTENTION_TARGETS`, the seed study's and diffusers' LoRA set) for
    lora/dora/hra; LoCon/LoHa/LoKr add the ResNet convolutions, ``time_emb_proj`` and the down/upsampler
    convolutions (:data:`~slimtune.models.diffusion.UNET_CONV_TARGETS`, LyCORIS' default). DiT (Flux): every
    attention, context and MLP Linear of the blocks (:data:`~slimtune.models.diffusion.FLUX_TARGETS`).
    ``"none"`` returns the LoRA targets (unused: a full fine-tune adapts nothing).
    """
    spec = _spec(preset)
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if isinstance(spec, DiffusionPreset) and spec.family == "unet":
        return list(UNET_ATTENTION_TARGETS + (UNET_CONV_TARGETS if method in CONV_METHODS else ()))
    if isinstance(spec, ModelPreset) and spec.family == "hf":
        return ALL_LINEAR
    return list(spec.targets)


def make_adapter_config(method: str, rank: int, alpha: float | None, targets: list[str] | str,
                        adapter_dtype: torch.dtype | None = None) -> Any:
    """slimtune's adapter config for ``method`` (``alpha`` defaults to ``rank``; HRA has none).

    ``lora``/``locon``: :class:`~slimtune.LoraConfig` (convolution targets get LoCon layers);
    ``dora``/``dora-recompute``/``dora-recompute-unshared``: LoraConfig with ``use_dora`` (and
    ``dora_recompute``, :data:`DORA_RECOMPUTE`); ``hra``, ``loha``,
    ``lokr``: their configs. ``method="none"`` has no config (:class:`ConfigError`).
    """
    alpha = rank if alpha is None else alpha
    targets = targets if isinstance(targets, str) else list(targets)  # a string: a regex or "all-linear"
    if method in ("lora", "locon") or method in DORA_RECOMPUTE:
        extra = {"use_dora": True, "dora_recompute": DORA_RECOMPUTE[method]} if method in DORA_RECOMPUTE else {}
        return LoraConfig(r=rank, alpha=alpha, target_modules=targets, adapter_dtype=adapter_dtype,
                                   **extra)
    if method == "hra":
        return HraConfig(r=rank, target_modules=targets, adapter_dtype=adapter_dtype)
    if method == "loha":
        return LohaConfig(r=rank, alpha=alpha, target_modules=targets, adapter_dtype=adapter_dtype)
    if method == "lokr":
        return LokrConfig(r=rank, alpha=alpha, target_modules=targets, adapter_dtype=adapter_dtype)
    raise ConfigError(f"method {method!r} has no adapter config; choose from {', '.join(METHODS[:-1])}")


def enable_gradient_checkpointing(preset: str | Preset, model: nn.Module, adapted: bool,
                                  context_fn: Callable[[], tuple[Any, Any]] | None = None) -> None:
    """Non-reentrant activation checkpointing. LMs: transformers' per decoder layer (as the protocol's
    ``GC=1``; ``enable_input_require_grads`` when adapted). Diffusion: diffusers' per ResNet block and per
    transformer block of the denoiser. ``context_fn``: ``torch.utils.checkpoint``'s (the contexts the forward and
    the recomputation run in)."""
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if context_fn is not None:
        kwargs["context_fn"] = context_fn
    if isinstance(_spec(preset), DiffusionPreset):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if adapted:
        model.enable_input_require_grads()


# -- inputs -----------------------------------------------------------------------------------------
def sample_tokens(preset: str | Preset, seq: int, resolution: int | None = None) -> int:
    """Positions one sample puts through the model: ``seq`` for an LM; a UNet's latent pixels ``res²``; a DiT's
    image + text tokens ``(res/2)² + text_len``."""
    spec = _spec(preset)
    if isinstance(spec, ModelPreset):
        return seq
    res = resolution or spec.sample_size
    return res * res if spec.family == "unet" else latent_tokens(spec, res) + spec.text_len


def _randn(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, generator: torch.Generator | None
           ) -> torch.Tensor:
    return torch.randn(shape, device=device, dtype=dtype, generator=generator)


def make_inputs(preset: str | Preset, model: nn.Module | None, batch: int, seq: int,
                device: str | torch.device, dtype: str | torch.dtype, generator: torch.Generator | None = None,
                resolution: int | None = None) -> dict[str, torch.Tensor]:
    """The inputs of one training step (pass them to :func:`training_loss`, reuse them every step).

    ``generator`` must live on ``device`` (``torch.Generator(device=device).manual_seed(...)``); ``dtype`` is
    the floating inputs' dtype (the model's compute dtype). ``model`` is unused today (the preset fixes the
    shapes); pass it for forward compatibility.

    * LM: ``input_ids`` = ``labels`` (the same tensor) ``[batch, seq]`` int64 in ``[0, min(vocab, 128000))``.
    * UNet: ``sample`` ``[batch, in_channels, res, res]``, ``timestep`` ``[batch]`` int64 in ``[0, 1000)``,
      ``encoder_hidden_states`` ``[batch, 77, cross_attention_dim]``; SDXL adds ``added_cond_kwargs`` =
      ``{"text_embeds": [batch, 1280], "time_ids": [batch, 6]}``; and ``target`` (the loss's, shape of the
      prediction).
    * DiT (Flux): ``hidden_states`` ``[batch, (res/2)², in_channels]`` (packed 2x2 latents),
      ``encoder_hidden_states`` ``[batch, text_len, joint_attention_dim]``, ``pooled_projections``
      ``[batch, pooled_projection_dim]``, ``timestep`` ``[batch]`` in ``[0, 1)``, ``img_ids`` ``[(res/2)², 3]``,
      ``txt_ids`` ``[text_len, 3]``, ``guidance`` ``[batch]`` (guidance-distilled models), and ``target``.
    """
    spec = _spec(preset)
    device = torch.device(device)
    dtype = resolve_dtype(dtype)
    if isinstance(spec, ModelPreset):
        ids = torch.randint(0, min(spec.vocab_size, TOKEN_HIGH), (batch, seq), device=device, generator=generator)
        return {"input_ids": ids, "labels": ids}
    res = resolution or spec.sample_size
    config = spec.config
    text = _randn((batch, spec.text_len, spec.cross_attention_dim), device, dtype, generator)
    if spec.family == "unet":
        if not unet_resolution_ok(spec, res):
            levels = len(config["block_out_channels"])
            raise ConfigError(f"{spec.name}: latent resolution {res} must be a multiple of {2 ** (levels - 1)}")
        out_channels = int(config.get("out_channels", 4))
        inputs: dict[str, Any] = {
            "sample": _randn((batch, spec.in_channels, res, res), device, dtype, generator),
            "timestep": torch.randint(0, 1000, (batch,), device=device, generator=generator),
            "encoder_hidden_states": text,
        }
        if config.get("addition_embed_type") == "text_time":
            time_dim = int(config["addition_time_embed_dim"])
            pooled = int(config["projection_class_embeddings_input_dim"]) - 6 * time_dim
            inputs["added_cond_kwargs"] = {
                "text_embeds": _randn((batch, pooled), device, dtype, generator),
                "time_ids": torch.tensor([[res * 8, res * 8, 0, 0, res * 8, res * 8]], device=device,
                                         dtype=dtype).expand(batch, 6).contiguous()}
        inputs["target"] = _randn((batch, out_channels, res, res), device, dtype, generator)
        return inputs
    if res % 2:
        raise ConfigError(f"{spec.name}: latent resolution {res} must be even (2x2 patches)")
    tokens = latent_tokens(spec, res)
    side = res // 2
    rows, cols = torch.meshgrid(torch.arange(side, device=device), torch.arange(side, device=device), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(tokens, 3).to(dtype)
    inputs = {
        "hidden_states": _randn((batch, tokens, spec.in_channels), device, dtype, generator),
        "encoder_hidden_states": text,
        "pooled_projections": _randn((batch, int(config.get("pooled_projection_dim", 768))), device, dtype,
                                     generator),
        "timestep": torch.rand((batch,), device=device, dtype=dtype, generator=generator),
        "img_ids": img_ids,
        "txt_ids": torch.zeros((spec.text_len, 3), device=device, dtype=dtype),
    }
    if config.get("guidance_embeds"):
        inputs["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
    patch = int(config.get("patch_size", 1))
    out_channels = int(config.get("out_channels") or spec.in_channels)
    inputs["target"] = _randn((batch, tokens, patch * patch * out_channels), device, dtype, generator)
    return inputs


# -- the loss ---------------------------------------------------------------------------------------
def forward_loss(preset: str | Preset, model: nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
    """``(loss, outputs)``: the forward pass and its scalar loss; ``outputs`` is what the model returned (an LM's
    ``CausalLMOutput`` with its logits; a denoiser's prediction). Keep ``outputs`` alive only to reproduce a
    loop that holds them (the PEFT baseline protocol keeps the LM's outputs into the next step)."""
    if isinstance(_spec(preset), ModelPreset):
        out = model(**inputs)
        return out.loss, out
    model_inputs = {k: v for k, v in inputs.items() if k != "target"}
    pred = model(**model_inputs)
    return F.mse_loss(pred.float(), inputs["target"].float()), pred


def training_loss(preset: str | Preset, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The scalar training loss of one forward pass: causal-LM cross entropy (transformers' own, from
    ``labels``) for LMs; ``mse(prediction.float(), target.float())`` for diffusion models."""
    return forward_loss(preset, model, inputs)[0]
