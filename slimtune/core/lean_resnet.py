"""A diffusers ``ResnetBlock2D`` as one autograd Function (installed by :mod:`.lean_layers`): frozen (LoRA's blocks,
whose targets are the attention and feed-forward layers), or with LoCon on its convolutions and LoRA on its time
projection (LoCon's default targets).

The block, for x ``[B, C_in, H, W]`` and the time embedding t ``[B, T]``::

    h1 = conv1(silu(norm1(x))) + proj(silu(t))[:, :, None, None]
    y  = (shortcut(x) + conv2(dropout(silu(norm2(h1))))) / output_scale_factor

Run as diffusers runs it, PyTorch's autograd keeps six tensors the size of the activations: x, norm1's output,
SiLU's output (conv1's input), h1, norm2's output and its SiLU's output. The frozen layers' input gradient needs
only x and h1 (each GroupNorm rebuilds its output from its input in backward, one memory-bound pass, and a frozen
convolution's input gradient needs only its weight). The lean layers one by one
(:class:`~.lean_layers.NormSiluFunction`, :class:`~.lean_layers.FrozenConvFunction`) keep the same two, but as four
Python autograd nodes plus PyTorch's own: ~225 µs of host time per block and step more than the plain block on the
CPU box, against ~85 µs here (RESULTS.md run 95). This Function runs the block's ops under ``no_grad`` in forward
(no autograd bookkeeping per op) and its backward in one node, with the kernels autograd's nodes run
(:mod:`.aten_grads`), so values and gradients are the plain block's bit for bit (tested). It keeps x, h1 and the two
norms' statistics (``[B, groups]``).

With LoCon on conv1, conv2 or the shortcut (:data:`LORA_CONV`) and LoRA on the time projection (:data:`LORA_LINEAR`),
the Function runs their compositions inside (``base(s) + up(down(s))``, ``x Wᵀ + b + s·(x Aᵀ) Bᵀ``) with the same
ops and casts, and its backward gives their factors' gradients from the ops autograd's nodes of those compositions
run (:func:`~.aten_grads.conv_grads`, :func:`~.lowrank.factor_grads`): bit for bit again, the whole UNet step
included (tested). It keeps what the block's recipes keep (:mod:`.rebuild`: each convolution's input rebuilt from
x or h1) and each LoCon's ``h = down(s)`` (r channels, as its composition does) — one Python node where the block's
lean layers one by one, its recipe scope and the hooks around each LoCon composition were ~260 µs of host time per
block and step more than the plain block on the CPU box; ~150 µs here (RESULTS.md run 99).

Where the block is anything else — up- or downsampling inside, a ``scale_shift`` time embedding norm, dropout in
training, autocast on, a frozen parameter or the time embedding asking for a gradient, an adapter of another kind,
disabled, merged or with dropout in training, ``torch.compile`` tracing — the block runs its own forward (its
layers' lean forwards apply there as before, in its recipe scope where it holds an adapter).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .aten_grads import conv_grads, conv_input_grad, group_norm_input_grad, group_norm_with_stats, silu_grad
from .compute import autocasting, cast, cast_optional, mm_scaled
from .lowrank import factor_grads
from .tracing import compiling

#: ``(module, class)`` of the adapters the Function runs inside the block: LoRA on a convolution (LoCon: conv1, conv2,
#: conv_shortcut) and on the time embedding's Linear (``time_emb_proj``), each over a plain layer
LORA_CONV = ("slimtune.methods.lora.conv", "LoraConv")
LORA_LINEAR = ("slimtune.methods.lora.linear", "LoraLinear")
#: the block's layers that may hold one, in the order the Function takes their factors (A, B each)
ADAPTABLE = ("conv1", "time_emb_proj", "conv2", "conv_shortcut")


Factors = tuple[torch.Tensor, torch.Tensor] | None  # a layer's LoRA (A, B), or None for a frozen layer alone


def _is(m: Any, spec: tuple[str, str]) -> bool:
    cls = type(m)
    return cls.__name__ == spec[1] and cls.__module__ == spec[0]


def _adapted(m: Any) -> bool:
    """A LoRA adapter the Function runs itself (:data:`LORA_CONV`, :data:`LORA_LINEAR`)."""
    return _is(m, LORA_CONV) or _is(m, LORA_LINEAR)


def _base(m: nn.Module | None) -> nn.Module | None:
    return m.base_layer if _adapted(m) else m


def adapted_layers(block: nn.Module) -> tuple[str, ...]:
    """The names of the block's layers that hold LoRA (:data:`ADAPTABLE` order; asked once per call)."""
    return tuple(name for name in ADAPTABLE if _adapted(getattr(block, name)))


def factors_of(block: nn.Module, adapted: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
    """``A, B`` of every layer of ``adapted``, flat: the Function's trailing inputs."""
    return tuple(p for name in adapted for layer in (getattr(block, name),) for p in (layer.lora_A, layer.lora_B))


def _norm(norm: nn.GroupNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return group_norm_with_stats(x, norm.num_groups, norm.weight, norm.bias, norm.eps)


def _conv(layer: nn.Module, x: torch.Tensor, factors: Factors) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(y, h)``: the layer's output on x and, for LoCon, ``h = down(x)`` (its up convolution's input, which its
    composition keeps too: r channels). As the composition computes it (:func:`~.lowrank.conv_low_rank_forward`):
    ``base(x) + up(down(x))`` with ``up = s·B`` scaled in B's dtype, A and up cast to x's dtype."""
    conv = layer if factors is None else layer.base_layer
    y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    if factors is None:
        return y, None
    down, up = factors
    h = F.conv2d(x, cast(down, x.dtype), None, conv.stride, conv.padding, conv.dilation)
    delta = F.conv2d(h, cast(up * layer.scaling, x.dtype), None, 1, 0, 1, conv.groups)
    return y + delta.to(y.dtype), h


def _conv_backward(layer: nn.Module, grad: torch.Tensor, x: torch.Tensor, h: torch.Tensor | None, factors: Factors
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dx through the base, dx through down, dA, dB)`` of :func:`_conv` for the output gradient ``grad`` (x: the
    input, or for a frozen layer alone anything of its shape; the last three None there), with the ops and casts
    autograd's nodes of the composition run."""
    conv = layer if factors is None else layer.base_layer
    dx = conv_input_grad(grad, conv.weight, tuple(x.shape), conv.stride, conv.padding, conv.dilation, conv.groups)
    if factors is None:
        return dx, None, None, None
    down, up = factors
    ones, zeros = (1,) * (grad.dim() - 2), (0,) * (grad.dim() - 2)
    dh, d_up, _ = conv_grads(grad, h, cast(up * layer.scaling, x.dtype), ones, zeros, ones, conv.groups,
                             (True, True, False))
    dx_down, d_down, _ = conv_grads(dh, x, cast(down, x.dtype), conv.stride, conv.padding, conv.dilation, 1,
                                    (True, True, False))
    return dx, dx_down, cast(d_down, down.dtype), cast(d_up, up.dtype) * layer.scaling


def _input_grad(layer: nn.Module, grad: torch.Tensor, x: torch.Tensor, h: torch.Tensor | None, factors: Factors,
                grads: dict[str, tuple], name: str) -> torch.Tensor:
    """dx of :func:`_conv` for a convolution whose input nothing else reads (a SiLU's output): its base's and down's
    two contributions summed (a sum of two, the same either way round, as autograd would add them); the factors'
    gradients into ``grads[name]``."""
    dx, dx_down, d_down, d_up = _conv_backward(layer, grad, x, h, factors)
    if dx_down is None:
        return dx
    grads[name] = (d_down, d_up)
    return dx + dx_down


def _linear(layer: nn.Module, t: torch.Tensor, factors: Factors) -> torch.Tensor:
    """The time embedding's projection of t ``[B, T]`` -> ``[B, C]``: the Linear, or LoRA's over it as
    :class:`~.lowrank.LowRankLinearFunction` computes it (``x Wᵀ + b``, then ``s·(x Aᵀ) Bᵀ`` added in one GEMM)."""
    if factors is None:
        return F.linear(t, layer.weight, layer.bias)
    linear = layer.base_layer
    down, up = factors
    y = F.linear(t, cast(linear.weight, t.dtype), cast_optional(linear.bias, t.dtype))
    return y.addmm_(F.linear(t, cast(down, t.dtype)), cast(up, t.dtype).t(), alpha=layer.scaling)


def _linear_factor_grads(layer: nn.Module, grad: torch.Tensor, t: torch.Tensor,
                         factors: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dA, dB)`` of the LoRA projection for its output gradient ``grad`` ``[B, C]``, as
    :class:`~.lowrank.LowRankLinearFunction`'s backward computes them (t asks for none)."""
    down, up = factors
    a, b = cast(down, t.dtype), cast(up, t.dtype)
    dy = cast(grad, t.dtype)
    d_down, d_up = factor_grads(dy, t, a, b, layer.scaling, True, True, dy_up=mm_scaled(dy, b, layer.scaling))
    return cast(d_down, down.dtype), cast(d_up, up.dtype)


class ResnetBlockFunction(torch.autograd.Function):
    """The block of the module docstring on x ``[B, C_in, H, W]`` and t ``[B, T]`` (or None) -> ``[B, C_out, H', W']``,
    with the names of its layers that hold LoRA (:func:`adapted_layers`), then their factors (:func:`factors_of`);
    saves x, h1, the norms' statistics and, per LoCon convolution, its ``h = down(input)`` (r channels, as its
    composition does). x comes three times — a LoCon shortcut's down convolution's (None where the shortcut holds
    none), the shortcut's and the main path's — so that
    autograd receives their gradients one after the other, as from the plain block, and adds them to x's other
    consumers' in the plain block's order (the sum is then the same bit for bit). Backward, for dy:
    ``g = dy / output_scale_factor`` and the shortcut's input gradient of g, first; ``dh1`` through conv2's input
    gradient, SiLU's backward on norm2's output (rebuilt from h1) and norm2's input gradient; the time projection's
    LoRA factors from ``dh1`` summed over the image; ``dx`` through conv1, SiLU (norm1's output rebuilt from x) and
    norm1 the same way. A LoCon convolution's factors come on the way, from its input rebuilt (SiLU of the norm's
    output). x and the factors are the inputs that get gradients."""

    @staticmethod
    def forward(ctx: Any, x_shortcut_down: torch.Tensor, x_shortcut: torch.Tensor, x: torch.Tensor,
                temb: torch.Tensor | None, block: nn.Module, adapted: tuple[str, ...],
                *factors: torch.Tensor) -> torch.Tensor:
        lora = _factors_by_layer(adapted, factors)
        h0, mean1, rstd1 = _norm(block.norm1, x)
        h1, h_down1 = _conv(block.conv1, F.silu(h0), lora["conv1"])
        del h0
        t = None
        if temb is not None:  # with a time embedding projection (applies() checked both)
            t = temb if block.skip_time_act else F.silu(temb)
            h1 = h1 + _linear(block.time_emb_proj, t, lora["time_emb_proj"])[:, :, None, None]
        h2, mean2, rstd2 = _norm(block.norm2, h1)
        out, h_down2 = _conv(block.conv2, F.silu(h2), lora["conv2"])
        del h2
        shortcut, h_down_sc = (x_shortcut, None) if block.conv_shortcut is None else \
            _conv(block.conv_shortcut, x_shortcut.contiguous(), lora["conv_shortcut"])
        lora_saved = (t if lora["time_emb_proj"] is not None else None, h_down1, h_down2, h_down_sc) if adapted else ()
        ctx.save_for_backward(x, h1, mean1, rstd1, mean2, rstd2, *lora_saved, *factors)
        ctx.block, ctx.adapted = block, adapted
        scale = block.output_scale_factor
        return (shortcut + out) / scale if scale != 1 else shortcut.add(out)  # x / 1 is x, bit for bit

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        block, adapted = ctx.block, ctx.adapted
        x, h1, mean1, rstd1, mean2, rstd2, *rest = ctx.saved_tensors
        t, h_down1, h_down2, h_down_sc, *factors = rest if adapted else (None,) * 4
        lora = _factors_by_layer(adapted, factors)
        grads: dict[str, tuple] = {}
        scale = block.output_scale_factor
        g = grad / scale if scale != 1 else grad
        shortcut_grad, shortcut_down_grad = g, None
        if block.conv_shortcut is not None:  # a LoCon shortcut's two contributions to dx go out apart, down's first
            shortcut_grad, shortcut_down_grad, *sc = _conv_backward(block.conv_shortcut, g, x, h_down_sc,
                                                                    lora["conv_shortcut"])
            grads["conv_shortcut"] = sc
        h2 = _norm(block.norm2, h1)[0]
        s2 = F.silu(h2) if lora["conv2"] is not None else h2  # a frozen conv2 needs only its input's shape
        ds2 = _input_grad(block.conv2, g, s2, h_down2, lora["conv2"], grads, "conv2")
        del s2
        dh1 = group_norm_input_grad(silu_grad(ds2, h2), h1, mean2, rstd2, block.norm2.weight, block.norm2.num_groups)
        del ds2, h2
        if lora["time_emb_proj"] is not None:  # autograd's sum to t's broadcast shape, [B, C, 1, 1]
            temb_grad = dh1.sum((2, 3), keepdim=True).view(dh1.shape[0], dh1.shape[1])
            grads["time_emb_proj"] = _linear_factor_grads(block.time_emb_proj, temb_grad, t, lora["time_emb_proj"])
        h0 = _norm(block.norm1, x)[0]
        s0 = F.silu(h0) if lora["conv1"] is not None else h0
        ds0 = _input_grad(block.conv1, dh1, s0, h_down1, lora["conv1"], grads, "conv1")
        del dh1, s0
        dx = group_norm_input_grad(silu_grad(ds0, h0), x, mean1, rstd1, block.norm1.weight, block.norm1.num_groups)
        return (shortcut_down_grad, shortcut_grad, dx, None, None, None, *(g for name in adapted for g in grads[name]))


_FROZEN: dict[str, Factors] = dict.fromkeys(ADAPTABLE)  # a block without adapters (read only)


def _factors_by_layer(adapted: tuple[str, ...], factors: Sequence[torch.Tensor]) -> dict[str, Factors]:
    """Each :data:`ADAPTABLE` layer's ``(A, B)`` out of the Function's flat factors, or None where it holds no
    adapter."""
    if not adapted:
        return _FROZEN
    lora: dict[str, Factors] = dict.fromkeys(ADAPTABLE)
    for i, name in enumerate(adapted):
        lora[name] = (factors[2 * i], factors[2 * i + 1])
    return lora


def fits(block: nn.Module) -> bool:
    """Whether ``block`` (a diffusers ``ResnetBlock2D`` with its class's forward) has the form this Function runs:
    GroupNorms, SiLU, plain Conv2d layers with zero padding given in numbers (or LoCon over one: :data:`LORA_CONV`), no
    up- or downsampling inside, the ``default`` time embedding norm, a plain Linear (or LoRA over one, or none) for the
    time embedding, a Dropout. (Whether they are frozen, and the adapters enabled and without dropout, is asked per
    call: :func:`applies`.)"""
    convs = [block.conv1, block.conv2] + ([block.conv_shortcut] if block.conv_shortcut is not None else [])
    nonlinearity = block.nonlinearity
    return (block.upsample is None and block.downsample is None and block.time_embedding_norm == "default"
            and all(type(n) is nn.GroupNorm for n in (block.norm1, block.norm2))  # exact types: no adapter, no subclass
            and type(nonlinearity) is nn.SiLU and not nonlinearity.inplace
            and all((_is(c, LORA_CONV) or type(c) is nn.Conv2d) and type(_base(c)) is nn.Conv2d
                    and _base(c).padding_mode == "zeros" and not isinstance(_base(c).padding, str) for c in convs)
            and (block.time_emb_proj is None or type(_base(block.time_emb_proj)) is nn.Linear
                 and (type(block.time_emb_proj) is nn.Linear or _lora_linear_fits(block.time_emb_proj)))
            and isinstance(block.dropout, nn.Dropout) and isinstance(block.output_scale_factor, (int, float)))


def _lora_linear_fits(layer: nn.Module) -> bool:
    """LoRA over a plain ``nn.Linear`` stored ``[d_out, d_in]`` (not transformers' Conv1D layout)."""
    return _is(layer, LORA_LINEAR) and not layer.fan_in_fan_out


def applies(block: nn.Module, x: Any, temb: Any, adapted: tuple[str, ...] = ()) -> bool:
    """Whether this call runs as :class:`ResnetBlockFunction` (checked on the host every call): a 4-D x that asks for a
    gradient with gradients on, a time embedding that does not, no dropout in training, autocast off (the block's
    casts would differ), the block's own parameters still frozen, its adapters enabled, unmerged and without dropout
    in training, not under ``torch.compile`` (whose partitioner decides what a graph saves)."""
    if not (isinstance(x, torch.Tensor) and x.dim() == 4 and x.requires_grad and torch.is_grad_enabled()) \
            or compiling():
        return False
    if (temb is None) != (block.time_emb_proj is None):  # diffusers' own forward decides (or raises) then
        return False
    if temb is not None and (not isinstance(temb, torch.Tensor) or temb.requires_grad):
        return False
    if (block.training and block.dropout.p > 0) or autocasting(x):
        return False
    for name in adapted:  # ``adapted``: adapted_layers(block)
        layer = getattr(block, name)
        if layer.disabled or layer.merged or (layer.training and layer.dropout_p > 0):
            return False
    for layer in _layers(block):
        if layer is not None:
            layer = layer.base_layer if adapted and _adapted(layer) else layer
            for p in (layer.weight, layer.bias):  # None for a GroupNorm without affine parameters, a layer without bias
                if p is not None and p.requires_grad:
                    return False
    return True


def _layers(block: nn.Module) -> tuple[nn.Module | None, ...]:
    """The layers whose parameters :class:`ResnetBlockFunction` reads (:func:`fits` checked they are plain GroupNorm,
    Conv2d and Linear layers, or LoRA over one, so weight and bias, or None, are all they hold)."""
    return (block.norm1, block.conv1, block.time_emb_proj, block.norm2, block.conv2, block.conv_shortcut)
