"""Frozen layers that keep only what backward needs, installed by :func:`slimtune.adapt`.

An adapter leaves most of the network frozen; the frozen layers still pass gradients on (``dx``) but never need
their own weight gradients. What PyTorch keeps for them that those gradients never read:

* A frozen **convolution** keeps its input: PyTorch's convolution saves input and weight whatever needs a gradient
  (a frozen ``nn.Linear`` keeps only its weight). :class:`FrozenConvFunction` runs the same convolution and saves
  the weight alone; its backward is the backward-data op autograd's own node runs
  (:func:`~.aten_grads.conv_input_grad`, without ``torch.nn.grad.conv2d_input``'s Python wrapper), bit for bit. In a
  diffusion UNet every ResNet and resampling convolution's input is a tensor nothing else keeps.
* A **GroupNorm followed by SiLU** (a UNet's ResNet blocks and output head) keeps the norm's input (the norm
  saves it) and the norm's output (SiLU saves its input). :class:`NormSiluFunction` saves the norm's input — the
  tensor the norm already keeps, so nothing new — and rebuilds the norm's output in backward (one more GroupNorm
  forward, a memory-bound pass), then runs SiLU's own backward kernel (:mod:`.aten_grads`): the gradients are the
  plain path's, bit for bit.
* diffusers' **GEGLU** (``h ⊙ gelu(gate)``, ``(h, gate)`` the two halves of its projection's output p) keeps p
  (the product and the GELU each save a half of it) and ``gelu(gate)`` (the product saves it): 12 values per
  feature instead of 8. :class:`GegluFunction` saves p alone and rebuilds ``gelu(gate)`` in backward (an
  elementwise pass), with GELU's own backward kernel (:mod:`.aten_grads`): bit for bit again. In a Stable Diffusion
  UNet that is a third of its feed-forward activations, with no GEMM recomputed (``memory="balanced"`` recomputes
  the projection too, and keeps only its input).
* A diffusers **ResnetBlock2D** that holds no adapter (LoRA's: its targets are attention and feed-forward layers)
  runs as one :class:`~.lean_resnet.ResnetBlockFunction`: it keeps what the layers above keep one by one (the
  block's input and conv1's output) in one Python autograd node instead of four beside PyTorch's own, its forward
  ops run without autograd bookkeeping — ~85 µs of host time per block and step more than the plain block, against
  ~225 µs for the layers one by one (RESULTS.md run 95) — with the plain block's values and gradients bit for bit.
  So does one with LoCon on its convolutions and LoRA on its time projection (LoCon's), the adapters' compositions
  inside the Function (~150 µs over the plain block against ~260 µs for its lean layers and recipes, run 99).
* diffusers' **Attention** is called without its per-call ``inspect.signature`` of the processor, and with its
  default processor its body runs without the steps that do nothing in a UNet's or DiT's blocks (the division by a
  rescale factor of 1, dropout at p = 0) (:mod:`.attention_call`; nothing saved changes, host time only).
* The **RMSNorm** of transformers' Llama-family models (:data:`RMS_NORM_CLASSES`) keeps a float32 copy of its input
  (4 bytes per element in bf16), over about eight kernels forward and ten backward.
  The lean norm keeps the input itself and a float32 ``rstd`` per row: on CUDA as PyTorch's fused ``F.rms_norm``
  (one C++ kernel each way; it rounds once where the module rounds twice, so an output element can differ by one
  unit in the last place), elsewhere :class:`~.rms_norm.RmsNormFunction` (the CPU runs the module's own ops inside
  it, bit for bit; a float32 weight over bf16 activations takes its Triton kernels on CUDA) (:mod:`.rms_norm`).
* The gated **MLP** of those models (:data:`MLP_CLASSES`, ``down(silu(gate(x)) * up(x))``) keeps ``gate(x)``,
  ``silu(gate(x))`` and ``up(x)`` for its activation and product. :class:`~.swiglu.SwigluFunction` keeps the two
  projections' outputs and rebuilds the SiLU in backward: one Triton launch each way on CUDA (one-ulp differences
  from Triton's ``exp``, rarely), PyTorch's own ops and SiLU backward kernel elsewhere (bit for bit).

An **adapter** keeps its layer's input for its own weight gradients, and that input is often the output of one of the
layers above, one cheap pass from tensors that layer keeps anyway. So the adapter keeps a recipe instead
(:mod:`.rebuild`, PyTorch's saved-tensor hooks; the recipe's pass runs in backward, the same ops, so bit for bit):

* in a Llama-family MLP, ``down_proj``'s input ``silu(g) ⊙ u``, rebuilt from g and u (:func:`~.swiglu.swiglu_forward`),
  where it is at least :data:`MLP_RECIPE_BYTES` (long sequences: smaller steps are host-bound, and the recipe's
  hooks and launch cost more time than its memory is worth);
* in a diffusers ``BasicTransformerBlock`` or ``ResnetBlock2D`` that holds an adapter (:data:`DIFFUSERS_BLOCKS`: its
  forward runs in a :class:`~.rebuild.RebuildScope`), the outputs of its LayerNorms (:data:`BLOCK_NORMS`, rebuilt
  from their inputs), of its GEGLU (from the projection) and of its GroupNorm + SiLU pairs (from the norm's input),
  which the attention projections, the feed-forward Linears and adapted convolutions would keep.

Each frozen ``nn.Conv1d/2d/3d`` (zero padding, numeric padding), ``nn.GroupNorm`` and ``nn.SiLU`` whose class
keeps PyTorch's ``forward``, and each ``GEGLU`` of ``diffusers.models.activations`` (off NPUs, where diffusers runs
its own fused GEGLU), and each RMSNorm and MLP of :data:`RMS_NORM_CLASSES` and :data:`MLP_CLASSES`, and each block
above holding an adapter (and its LayerNorms) gets an instance-level ``forward`` (no module is replaced: parameter names and checkpoints do not change; :func:`install`'s
remover undoes it; SiLU only where the model has a GroupNorm). Each call checks, on the host, whether the lean path
applies — gradients on, the input requiring grad, the layer's parameters frozen, not under ``torch.compile`` (whose
partitioner decides what a graph saves), and for a UNet's layers and blocks a tensor of at least
:data:`UNET_LEAN_BYTES` (times the adapter method's ``unet_lean_scale``, :func:`install`'s ``size_scale``; smaller,
the host's time per call costs more than the memory is worth) — and otherwise runs
the layer as it is. A SiLU takes the fused path only when its input is the very output of the GroupNorm that
ran last on this thread and was not changed in place since (its version counter), so ``silu(norm(x) + t)`` and
any other use run plainly.
"""
from __future__ import annotations

import copy
import sys
import threading
import weakref
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import lean_resnet
from .aten_grads import conv_input_grad, gelu_grad, silu_grad
from .attention_call import ATTENTION_CLASS, direct_call
from .autograd_state import saved_tensor_hooks_active
from .caches import TensorMark
from .compute import cast, cast_optional
from .rebuild import RebuildScope, offer, rebuilt_from
from .rms_norm import RmsNormFunction, fused_takes, takes_weight
from .swiglu import SwigluFunction, swiglu_forward
from .tracing import compiling

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class FrozenConvFunction(torch.autograd.Function):
    """``y = conv(x, W, b)`` for a frozen W (and b): saves W alone; backward returns ``dx`` only.

    x ``[B, C_in, *spatial]`` (or unbatched ``[C_in, *spatial]``), W ``[C_out, C_in/groups, *kernel]``, b ``[C_out]``
    or None; stride, padding, dilation as tuples of ints."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                stride: tuple[int, ...], padding: tuple[int, ...], dilation: tuple[int, ...],
                groups: int) -> torch.Tensor:
        dims = weight.dim() - 2
        y = _CONV[dims](x, weight, bias, stride, padding, dilation, groups)
        ctx.save_for_backward(weight)
        ctx.geometry = (tuple(x.shape), stride, padding, dilation, groups, y.dtype)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups, dtype = ctx.geometry
        dx = None
        if ctx.needs_input_grad[0]:
            batched = len(shape) == weight.dim()
            g = grad if batched else grad.unsqueeze(0)
            dx = conv_input_grad(g, weight.to(dtype), shape if batched else (1, *shape), stride, padding, dilation,
                                 groups)
            dx = dx if batched else dx.squeeze(0)
        return dx, None, None, None, None, None, None


class NormSiluFunction(torch.autograd.Function):
    """``silu(h)`` where ``h = group_norm(x, groups, γ, β, eps)``, saving x (and γ, β), not h: backward rebuilds
    h from x and runs SiLU's backward kernel on it. h, x ``[B, C, *]``; γ, β ``[C]`` or None. x gets no
    gradient here (it reaches x through the norm's own backward, from ``dh``)."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, x: torch.Tensor, groups: int, weight: torch.Tensor | None,
                bias: torch.Tensor | None, eps: float) -> torch.Tensor:
        ctx.save_for_backward(x, weight, bias)
        ctx.groups, ctx.eps, ctx.h_dtype = groups, eps, h.dtype
        return F.silu(h)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, bias = ctx.saved_tensors
        with torch.no_grad():  # h_dtype: float32 where autocast ran the norm (its float32 list): the same casts again
            h = group_norm_as(x, ctx.groups, weight, bias, ctx.eps, ctx.h_dtype)
        return silu_grad(grad, h), None, None, None, None, None


class GegluFunction(torch.autograd.Function):
    """``h ⊙ gelu(gate)`` with ``(h, gate) = p.chunk(2, -1)``: p ``[..., 2·d]`` -> ``[..., d]``, saving p alone.
    Backward, as autograd's own (so bit for bit): ``dgate = gelu'(gate)·(dy ⊙ h)`` (GELU's backward kernel,
    :mod:`.aten_grads`), ``dh = dy ⊙ gelu(gate)``, ``dp = [dh, dgate]`` — with gelu(gate) rebuilt, not the product."""

    @staticmethod
    def forward(ctx: Any, p: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(p)
        return geglu_output(p)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (p,) = ctx.saved_tensors
        h, gate = p.chunk(2, dim=-1)
        return torch.cat([grad * F.gelu(gate), gelu_grad(grad * h, gate)], dim=-1)


def geglu_output(p: torch.Tensor) -> torch.Tensor:
    """:class:`GegluFunction`'s output for ``p [..., 2·d]``, computed as its forward does (``[..., d]``)."""
    h, gate = p.chunk(2, dim=-1)
    return h * F.gelu(gate)


def group_norm_as(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """A GroupNorm's output ``[B, C, *]`` as the module computed it into ``dtype`` (float32 under autocast, whose
    float32 list casts x and the affine parameters)."""
    return F.group_norm(cast(x, dtype), groups, cast_optional(weight, dtype), cast_optional(bias, dtype), eps)


def norm_silu_output(x: torch.Tensor, norm: nn.GroupNorm, dtype: torch.dtype) -> torch.Tensor:
    """:class:`NormSiluFunction`'s output ``silu(norm(x))``, the norm computed into ``dtype`` as the module did:
    ``[B, C, *]``."""
    return F.silu(group_norm_as(x, norm.num_groups, norm.weight, norm.bias, norm.eps, dtype))


def layer_norm_output(x: torch.Tensor, norm: nn.LayerNorm, dtype: torch.dtype) -> torch.Tensor:
    """``norm(x)`` as ``nn.LayerNorm`` computed it into ``dtype`` (float32 under autocast, whose float32 list casts x
    and the affine parameters): ``[..., *normalized_shape]``."""
    return F.layer_norm(cast(x, dtype), norm.normalized_shape, cast_optional(norm.weight, dtype),
                        cast_optional(norm.bias, dtype), norm.eps)


#: A UNet's lean frozen layers (a convolution, a GroupNorm + SiLU, a GEGLU) and its blocks' recipe scopes apply where
#: the tensor they spare is at least this large (bytes): each is a Python autograd node or hook where PyTorch's are
#: C++, tens of microseconds of host time per call, and a UNet step at a small resolution is host-bound. In SD-1.5 at
#: batch 4, 64x64 latents (bf16) the two finest levels (10 and 5 MiB per tensor) hold four fifths of what the lean
#: layers spare, in fewer than half of their calls; the two coarsest (2.5 and 0.6 MiB) run plain. An adapter method
#: may ask for a multiple of it (:func:`install`'s ``size_scale``: LoKr's, whose adapted convolutions leave a ResNet
#: block in its own forward, each lean layer a node of its own, and whose step keeps far less than PEFT's anyway).
UNET_LEAN_BYTES = 4 * 2**20


def _large(t: torch.Tensor, scale: int) -> bool:
    """Whether ``t`` is at least ``scale`` times :data:`UNET_LEAN_BYTES` (a UNet's lean layer spares it, or a tensor
    of its size)."""
    return isinstance(t, torch.Tensor) and t.numel() * t.element_size() >= UNET_LEAN_BYTES * scale


def _lean(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """Whether a layer with these parameters takes its lean path for input ``x`` (module docstring). Asked on every
    call of every lean layer, so a plain loop (no generator)."""
    if not (isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled()) or compiling():
        return False  # not a tensor: the layer's own forward raises its own error
    for p in params:
        if p is not None and p.requires_grad:
            return False
    return True


class _InstanceForward:
    """An instance-level ``forward`` set on ``module`` itself, holding it weakly: the module holds the forward, so a
    strong reference back would be a cycle that keeps a deleted model's layers (and weights) alive until the garbage
    collector runs. A deep copy of the model gives the copy's module a forward of its own (through ``memo``), and
    pickling keeps the module. ``scale``: a UNet's lean paths apply from ``scale`` times :data:`UNET_LEAN_BYTES`."""

    def __init__(self, module: nn.Module, scale: int = 1) -> None:
        self._module = weakref.ref(module)
        self.scale = scale

    @property
    def module(self) -> nn.Module:
        module = self._module()
        if module is None:
            raise RuntimeError(f"{type(self).__name__} outlived its module")
        return module

    def __deepcopy__(self, memo: dict) -> "_InstanceForward":
        return type(self)(copy.deepcopy(self.module, memo), self.scale)

    def __reduce__(self) -> tuple:
        return type(self), (self.module, self.scale)


class _LeanConvForward(_InstanceForward):
    """A frozen convolution's instance ``forward``."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.module
        weight, bias = conv.weight, conv.bias  # each a Module.__getattr__: read once
        if not (_large(x, self.scale) and _lean(x, weight, bias)):
            return type(conv).forward(conv, x)
        return FrozenConvFunction.apply(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class _LastNorm(threading.local):
    """The GroupNorm that ran last on this thread: weak references to it and its input, and its output's mark (the
    slot keeps nothing alive)."""

    entry: tuple[weakref.ref, weakref.ref, TensorMark] | None = None

    def put(self, norm: nn.GroupNorm, x: torch.Tensor, h: torch.Tensor) -> None:
        self.entry = (weakref.ref(norm), weakref.ref(x), TensorMark(h))

    def take(self, h: torch.Tensor) -> tuple[nn.GroupNorm, torch.Tensor] | None:
        """``(norm, its input)`` if ``h`` is that norm's output, unchanged since; the slot is emptied either way."""
        entry, self.entry = self.entry, None
        if entry is None:
            return None
        norm, x = entry[0](), entry[1]()
        if norm is not None and x is not None and entry[2].matches(h):
            return norm, x
        return None


_LAST_NORM = _LastNorm()


class _LeanNormForward(_InstanceForward):
    """A frozen GroupNorm's instance ``forward``: its own, noting the output for a SiLU that may follow."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.module
        h = type(norm).forward(norm, x)
        if _large(h, self.scale) and _lean(x, norm.weight, norm.bias):
            _LAST_NORM.put(norm, x, h)
        return h


class _LeanSiluForward(_InstanceForward):
    """An ``nn.SiLU``'s instance ``forward``: fused with the GroupNorm before it when its input is that norm's
    output."""

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        silu = self.module
        taken = _LAST_NORM.take(h) if not silu.inplace and _lean(h) else None
        if taken is None:
            return type(silu).forward(silu, h)
        norm, x = taken
        y = NormSiluFunction.apply(h, x, norm.num_groups, norm.weight, norm.bias, norm.eps)
        offer(y, norm_silu_output, x, norm, h.dtype)  # in a ResNet block: an adapted conv after it keeps x, not y
        return y


class _LeanGegluForward(_InstanceForward):
    """A diffusers ``GEGLU``'s instance ``forward``: its projection, then :class:`GegluFunction` (diffusers' own
    arithmetic, ``h * F.gelu(gate)``, when the lean path does not apply)."""

    def __call__(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        geglu = self.module
        if args or kwargs:  # diffusers' deprecated ``scale``: its own forward warns
            return type(geglu).forward(geglu, hidden_states, *args, **kwargs)
        p = geglu.proj(hidden_states)
        if p.device.type == "mps" or not (_large(p, self.scale) and _lean(p)):
            h, gate = p.chunk(2, dim=-1)
            return h * geglu.gelu(gate)
        y = GegluFunction.apply(p)
        offer(y, geglu_output, p)  # in a transformer block: the Linear after it keeps p (kept here anyway), not y
        return y


class _LeanLayerNormForward(_InstanceForward):
    """A frozen ``nn.LayerNorm``'s instance ``forward`` inside a diffusers transformer block: its own, offering the
    output as a recipe from its input (which the norm keeps anyway) to the projections that keep it."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.module
        h = type(norm).forward(norm, x)
        if _lean(x, norm.weight, norm.bias):
            offer(h, layer_norm_output, x, norm, h.dtype)
        return h


class _LeanBlockForward(_InstanceForward):
    """A diffusers block's instance ``forward`` (``BasicTransformerBlock``, ``ResnetBlock2D``, holding an adapter): its
    own, inside a :class:`~.rebuild.RebuildScope` (where gradients flow, no checkpointing or offloading hooks own
    what is saved, and its input is at least :data:`UNET_LEAN_BYTES`), so that its adapted projections and
    convolutions keep recipes from the tensors its norms, GEGLU and norm + SiLU pairs keep, not those layers'
    outputs."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _scoped_forward(self.module, args, kwargs, self.scale)


def _scoped_forward(block: nn.Module, args: tuple, kwargs: dict, scale: int) -> Any:
    """The block's own forward, inside a :class:`~.rebuild.RebuildScope` where :class:`_LeanBlockForward` says
    (``scale``: its forward's, see :class:`_InstanceForward`)."""
    first = args[0] if args else kwargs.get("hidden_states", kwargs.get("input_tensor"))
    if (not torch.is_grad_enabled() or compiling() or saved_tensor_hooks_active()
            or not isinstance(first, torch.Tensor) or not _large(first, scale)):
        return type(block).forward(block, *args, **kwargs)
    with RebuildScope():
        return type(block).forward(block, *args, **kwargs)


def _large_block(x: Any, block: nn.Module, scale: int) -> bool:
    """Whether a ResNet block's larger activation (its input x, or conv1's output, ``C_out / C_in`` times x) is at
    least ``scale`` times :data:`UNET_LEAN_BYTES`."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        return False
    widest = max(x.shape[1], block.conv1.out_channels)
    return x.numel() // max(x.shape[1], 1) * widest * x.element_size() >= UNET_LEAN_BYTES * scale


class _LeanResnetForward(_InstanceForward):
    """A diffusers ``ResnetBlock2D``'s instance ``forward`` where it has the form :func:`~.lean_resnet.fits` (frozen
    layers, or LoCon and a LoRA time projection over them): the whole block as one
    :class:`~.lean_resnet.ResnetBlockFunction` where :func:`~.lean_resnet.applies` and its activations are at least
    :data:`UNET_LEAN_BYTES` (the size rule of the layers it replaces), else its own forward (its layers' lean forwards
    apply there, in a recipe scope where it holds an adapter)."""

    def __init__(self, module: nn.Module, scale: int = 1) -> None:
        super().__init__(module, scale)
        self._adapted: tuple[str, ...] | None = None  # found at the first call (a deep copy makes this before its
        # module has its layers), then kept: part of the block's form, as fits() found it at install

    def __call__(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args: Any, **kwargs: Any) -> Any:
        block, adapted = self.module, self._adapted
        if adapted is None:
            adapted = self._adapted = lean_resnet.adapted_layers(block)
        if args or kwargs or not (_large_block(input_tensor, block, self.scale)
                                  and lean_resnet.applies(block, input_tensor, temb, adapted)):
            if adapted:
                return _scoped_forward(block, (input_tensor, temb, *args), kwargs, self.scale)
            return type(block).forward(block, input_tensor, temb, *args, **kwargs)
        shortcut_down = input_tensor if "conv_shortcut" in adapted else None  # a LoCon shortcut's own gradient
        return lean_resnet.ResnetBlockFunction.apply(shortcut_down, input_tensor, input_tensor, temb, block, adapted,
                                                     *lean_resnet.factors_of(block, adapted))


class _AttentionForward(_InstanceForward):
    """diffusers' ``Attention``'s instance ``forward``: the processor called directly, or its default processor's body
    (:func:`~.attention_call.direct_call`: no signature inspection per call)."""

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return direct_call(self.module, *args, **kwargs)


class _LeanRmsNormForward(_InstanceForward):
    """A transformers RMSNorm's instance ``forward`` where the lean path applies and the weight has the input's dtype
    or float32 (else the module's own forward): on CUDA PyTorch's fused ``F.rms_norm`` where
    :func:`~.rms_norm.fused_takes`, else :class:`~.rms_norm.RmsNormFunction`."""

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        norm = self.module
        weight = norm.weight
        if not (takes_weight(hidden_states, weight) and _lean(hidden_states, weight)):
            return type(norm).forward(norm, hidden_states)
        if fused_takes(hidden_states, weight):  # PyTorch's fused kernel: the same two tensors kept, C++ on the host
            return F.rms_norm(hidden_states, weight.shape, weight, norm.variance_epsilon)
        return RmsNormFunction.apply(hidden_states, weight, norm.variance_epsilon)


#: ``(model family, class)`` of the transformers RMSNorm modules whose forward is Llama's (module docstring of
#: :mod:`.rms_norm`), each in ``transformers.models.<family>.modeling_<family>``
RMS_NORM_CLASSES: tuple[tuple[str, str], ...] = (
    ("llama", "LlamaRMSNorm"), ("mistral", "MistralRMSNorm"), ("mixtral", "MixtralRMSNorm"),
    ("qwen2", "Qwen2RMSNorm"), ("qwen2_moe", "Qwen2MoeRMSNorm"), ("qwen3", "Qwen3RMSNorm"),
    ("qwen3_moe", "Qwen3MoeRMSNorm"), ("phi3", "Phi3RMSNorm"), ("granite", "GraniteRMSNorm"),
)


class _LeanMlpForward(_InstanceForward):
    """A transformers gated MLP's instance ``forward``: its three projections as the class calls them, with
    :class:`~.swiglu.SwigluFunction` between them where the lean path applies."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mlp = self.module
        g, u = mlp.gate_proj(x), mlp.up_proj(x)
        if g.dtype is u.dtype and g.shape == u.shape and (_lean(g) or _lean(u)):
            h = SwigluFunction.apply(g, u)
            if h.numel() * h.element_size() < MLP_RECIPE_BYTES or saved_tensor_hooks_active():
                return mlp.down_proj(h)
            with rebuilt_from(h, swiglu_forward, g, u):  # an adapter on down_proj keeps g and u (kept anyway), not h
                return mlp.down_proj(h)
        return mlp.down_proj(mlp.act_fn(g) * u)


#: The smallest ``silu(g) ⊙ u`` (bytes) that an adapter on ``down_proj`` keeps as its recipe: below it the step is
#: host-bound and the recipe's hooks and rebuild launch cost more step time than its memory is worth (RESULTS.md
#: runs 65-66: Llama-3.2-3B at 4x512 tokens, 32 MiB per layer, the step 2-9% slower); at 4x2048 tokens (128 MiB)
#: the step is GPU-bound and the recipe saves 3.5 GiB.
MLP_RECIPE_BYTES = 64 * 2**20

#: ``(model family, class)`` of the transformers gated MLPs whose forward is Llama's,
#: ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``; lean where ``act_fn`` is transformers' SiLU
MLP_CLASSES: tuple[tuple[str, str], ...] = (
    ("llama", "LlamaMLP"), ("mistral", "MistralMLP"), ("qwen2", "Qwen2MLP"), ("qwen3", "Qwen3MLP"),
    ("granite", "GraniteMLP"),
)


def _listed_class(m: nn.Module, classes: tuple[tuple[str, str], ...]) -> bool:
    """Whether ``m``'s class is one of ``classes`` (each ``(module, name)``) and keeps that class's forward."""
    cls = type(m)
    for module, name in classes:
        if cls.__name__ == name and cls.__module__ == module:
            return cls.forward is getattr(sys.modules[module], name).forward  # loaded: m is one of its classes
    return False


def _transformers_class(m: nn.Module, classes: tuple[tuple[str, str], ...]) -> bool:
    """Whether ``m``'s class is one of ``classes`` (each ``(family, name)`` of ``transformers.models.<family>.
    modeling_<family>``) and keeps that class's forward."""
    return _listed_class(m, tuple((f"transformers.models.{family}.modeling_{family}", name)
                                  for family, name in classes))


def _transformers_rms_norm(m: nn.Module) -> bool:
    """One of :data:`RMS_NORM_CLASSES` with its class's forward, a 1-D weight and a float ``variance_epsilon``."""
    weight = getattr(m, "weight", None)
    return (_transformers_class(m, RMS_NORM_CLASSES) and isinstance(weight, torch.Tensor) and weight.dim() == 1
            and isinstance(getattr(m, "variance_epsilon", None), float))


def _transformers_silu_mlp(m: nn.Module) -> bool:
    """One of :data:`MLP_CLASSES` with its class's forward, whose ``act_fn`` is transformers' (or PyTorch's) SiLU with
    its class's forward."""
    if not _transformers_class(m, MLP_CLASSES):
        return False
    from transformers import activations  # loaded: m is a transformers class

    act = getattr(m, "act_fn", None)
    silu = getattr(activations, "SiLUActivation", nn.SiLU)  # transformers 4 used PyTorch's
    return (_keeps_forward(act, silu) or (_keeps_forward(act, nn.SiLU) and not act.inplace)) \
        and "forward" not in act.__dict__


def _diffusers_geglu(m: nn.Module) -> bool:
    """diffusers' ``GEGLU`` with its own forward and gelu (the class this module knows), off NPUs."""
    cls = type(m)
    if cls.__name__ != "GEGLU" or cls.__module__ != "diffusers.models.activations":
        return False
    import diffusers.models.activations as activations  # loaded: m is one of its classes
    from diffusers.utils import is_torch_npu_available

    return (cls.forward is activations.GEGLU.forward and cls.gelu is activations.GEGLU.gelu
            and not is_torch_npu_available())


#: ``(module, class)`` of diffusers' ResNet block (:mod:`.lean_resnet`: one Function where it holds no adapter)
RESNET_BLOCK = ("diffusers.models.resnet", "ResnetBlock2D")
#: ``(module, class)`` of the diffusers blocks that get a :class:`~.rebuild.RebuildScope` when they hold an adapter
DIFFUSERS_BLOCKS: tuple[tuple[str, str], ...] = (("diffusers.models.attention", "BasicTransformerBlock"), RESNET_BLOCK)


def _diffusers_block(m: nn.Module) -> bool:
    """One of :data:`DIFFUSERS_BLOCKS` with its class's forward."""
    return _listed_class(m, DIFFUSERS_BLOCKS)


def _diffusers_resnet(m: nn.Module, own_forward: set[nn.Module]) -> bool:
    """A diffusers ``ResnetBlock2D`` with its class's forward, of the form :func:`~.lean_resnet.fits`, none of its
    modules with a forward someone else set on the instance (``own_forward``: those without, adapters aside; an
    adapter the Function runs and its base layer keep their class's forward too)."""
    if not (_listed_class(m, (RESNET_BLOCK,)) and lean_resnet.fits(m)):
        return False
    inside = {c for name in lean_resnet.adapted_layers(m) for c in getattr(m, name).modules()}
    return (all("forward" not in c.__dict__ for c in inside)
            and all(c in own_forward for c in m.modules() if c not in inside))


#: the norms of a diffusers BasicTransformerBlock whose outputs go to its attention and feed-forward projections (their
#: lean forwards offer them)
BLOCK_NORMS = ("norm1", "norm2", "norm3")


def _keeps_forward(m: nn.Module, base: type) -> bool:
    return isinstance(m, base) and type(m).forward is base.forward


def _lean_conv(m: nn.Module) -> bool:
    """A convolution as PyTorch defines it (forward and ``_conv_forward`` its own), zero padding given in
    numbers."""
    return any(_keeps_forward(m, c) and type(m)._conv_forward is c._conv_forward for c in _CONV_TYPES) \
        and m.padding_mode == "zeros" and not isinstance(m.padding, str)


def install(model: nn.Module, skip: Callable[[nn.Module], bool] = lambda m: False,
            size_scale: int = 1) -> Callable[[], None]:
    """Give ``model``'s frozen convolutions, GroupNorms, (where there is a GroupNorm) SiLUs, diffusers GEGLUs and
    transformers RMSNorms and gated MLPs their lean ``forward`` (module docstring); modules for which ``skip`` is
    true, and their children, are left alone; a UNet's lean paths apply from ``size_scale`` (a positive integer)
    times :data:`UNET_LEAN_BYTES`. Returns the remover."""
    if isinstance(size_scale, bool) or not isinstance(size_scale, int) or size_scale < 1:
        raise ValueError(f"size_scale must be a positive integer, got {size_scale!r}")
    targets: list[tuple[nn.Module, Any]] = []
    stack, modules = [model], []
    while stack:
        m = stack.pop()
        if skip(m):
            continue
        if "forward" not in m.__dict__:  # not a forward someone already set on the instance (checkpointing)
            modules.append(m)
        stack.extend(m.children())
    has_norm = any(_keeps_forward(m, nn.GroupNorm) for m in modules)
    own_forward = set(modules)
    for m in modules:
        if _lean_conv(m):
            targets.append((m, _LeanConvForward(m, size_scale)))
        elif _keeps_forward(m, nn.GroupNorm):
            targets.append((m, _LeanNormForward(m, size_scale)))
        elif has_norm and _keeps_forward(m, nn.SiLU):
            targets.append((m, _LeanSiluForward(m)))
        elif _diffusers_geglu(m):
            targets.append((m, _LeanGegluForward(m, size_scale)))
        elif _diffusers_block(m) and any(skip(c) for c in m.modules()):  # an adapter inside keeps a layer's output
            block_forward = _LeanResnetForward if _diffusers_resnet(m, own_forward) else _LeanBlockForward
            targets.append((m, block_forward(m, size_scale)))
            norms = [getattr(m, name, None) for name in BLOCK_NORMS]
            targets.extend((n, _LeanLayerNormForward(n)) for n in norms
                           if _keeps_forward(n, nn.LayerNorm) and n in modules)
        elif _listed_class(m, (ATTENTION_CLASS,)):  # host time only: nothing saved changes
            targets.append((m, _AttentionForward(m)))
        elif _diffusers_resnet(m, own_forward):  # no adapter inside (that case is above): the block as one Function
            targets.append((m, _LeanResnetForward(m, size_scale)))
        elif _transformers_rms_norm(m):
            targets.append((m, _LeanRmsNormForward(m)))
        elif _transformers_silu_mlp(m):
            targets.append((m, _LeanMlpForward(m)))
    for m, forward in targets:
        m.forward = forward
    return _Restore(targets)


class _Restore:
    """:func:`install_lean_layers`' remover: each module's own ``forward`` back (an object, not a closure: a copy of
    the model gets one for its own modules)."""

    def __init__(self, targets: list[tuple[nn.Module, Any]]) -> None:
        self.targets = targets

    def __call__(self) -> None:
        for m, forward in self.targets:
            if m.__dict__.get("forward") is forward:
                del m.forward


def remove_within(module: nn.Module) -> int:
    """Give ``module`` and every module under it its own ``forward`` back where it runs a lean one; returns how
    many. For a region that ``torch.compile`` traces: the lean paths never apply there (module docstring), and
    Dynamo guards on the identity of each instance's forward object, so a stack of layers holding them would compile
    once per layer (and, past Dynamo's recompile limit, run the rest eagerly)."""
    removed = 0
    for m in module.modules():
        if installed(m):
            del m.forward
            removed += 1
    return removed


def installed(module: nn.Module) -> bool:
    """Whether ``module`` runs a lean ``forward`` of this module."""
    return isinstance(module.__dict__.get("forward"),
                      (_LeanConvForward, _LeanNormForward, _LeanSiluForward, _LeanGegluForward,
                       _LeanBlockForward, _LeanLayerNormForward, _LeanResnetForward, _AttentionForward,
                       _LeanRmsNormForward, _LeanMlpForward))
