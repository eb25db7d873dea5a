"""Step-time ratios from paired steps in one process: every configuration's model lives in the same process and
they take turns, one training step each, round after round.

Why: at seq 512 the 3B step is host-bound, and the lent machines' host speed drifts between processes and between
machines by more than the differences being measured (``RESULTS.md``, runs 23-26: LoHa ÷ LoRA 0.84 on one machine
and 1.22 on another, same code). The protocol's one-process-per-configuration timing (``model_compare.py``) stays
the reference for peak memory; for step-time *ratios*, paired steps put every configuration under the same host
conditions: each round times one step of each, and the ratio to the first configuration (the yardstick) is taken
within the round, then the median over rounds. The order rotates from round to round, so that no configuration
always runs right after the same other one (with a fixed order, runs 33-34 showed position effects of several
percent; ``launch_probe.py`` confirmed them on single layers).

Each step is the protocol's (forward, ``loss.backward()``, AdamW step, ``zero_grad(set_to_none=True)``,
synchronize), with the logits released before backward (the lean loop: the step time is the same, and the models
do not hold each other's outputs). Models are built with :class:`slimtune.memory.profile.TrainingSession` exactly
as the profiler builds them.

    python benchmarks/paired_steps.py --configs lora loha lokr peft-bf16:loha peft-bf16:lokr --rounds 30
    python benchmarks/paired_steps.py --quick     # tiny-llama on the CPU (smoke test)

``--before DIR``: DIR holds an earlier copy of the package as ``slimtune_before`` (``git archive REF slimtune``,
renamed); configurations ``before:METHOD`` are built by that copy, in this same process — so a change's cost is
measured step against step under the same host conditions. Each configuration's transient peak (the step's
``max_memory_allocated`` above what was allocated before it) is reported beside its time.

``alone:METHOD``: slimtune's METHOD with every LoRA layer running alone — no sibling fusion (q/k/v, gate/up as one
Function, ``slimtune.core.siblings``) — so the fusion's saving is measured in the same rounds.

``noprepass:METHOD``: slimtune's METHOD (DoRA) without its step-vector pre-pass (``slimtune.methods.dora.prepass``):
every DoRA layer forms its norm itself, so the pre-pass's saving is measured in the same rounds.

``stripped:METHOD`` (with ``--strip-lean KIND...``): slimtune's METHOD with those lean frozen layers
(``slimtune.core.lean_layers``: ``conv``, ``norm-silu``, ``geglu``) given their plain forward back, so a step's
cost or saving from each is measured against the full set in the same rounds.

``floor:METHOD``: slimtune's METHOD model with its adapters taken out (``slimtune.core.inject.detach``) and its
frozen lean layers kept, and one trainable scalar that scales the input embeddings' output, so that backward still
runs through every layer: the step an adapter that cost nothing would take, the floor under any method's step in the
same rounds (a little over it: it also runs layer 0's input gradient, which no adapter needs).

``trainloss:METHOD``: slimtune's METHOD with the loss ``slimtune train`` takes for a causal LM with a plain head
(``slimtune.memory.chunked_loss.model_causal_lm_loss``: the head and cross entropy chunk by chunk, no ``[tokens,
vocab]`` logits) instead of transformers' ``model(..., labels=...).loss``, which the other configurations take (the
protocol's; PEFT's users get it through Trainer).

``stacked:lora``: slimtune's LoRA with each sibling chain's frozen weights and A factors held in one buffer
(:mod:`slimtune.core.stacked_rows`) in eager steps too, where the library stacks them only in layers compiled by
``compile_layers``: one GEMM gives a chain's base outputs and ``x Aᵀ``, two its ``dx`` (stacked after one eager step,
in which the chains are learnt; each eager call checks its stack, :func:`~slimtune.core.stacked_rows.stacked_rows`).

``unstacked:lora`` / ``unstacked-one:lora`` (with ``--compile``): slimtune's LoRA with no chain of a compiled layer
stacked (:mod:`slimtune.core.stacked_rows`: each member's frozen weight and A apart), or with only the chains of one
(o, down) apart: what stacking saves or costs a compiled step, in the same rounds (run 179: at seq 2048 the stacked
GEMMs' widths, d + r, are no multiples of cuBLAS's tiles). (The ``wideone`` / ``wideo`` configurations of run 180,
chains of one stacked wide, were removed after it: slower.) ``tritonproduct:lora`` (with ``--compile``): compiled
stacked rows' forward products ``s·h Bᵀ`` from a Triton kernel (``product_sum_kernel.scaled_product_op``, a
``triton_op`` kept in the graph) instead of cuBLAS (run 181: a 64x32-tile kernel, about 40% of HBM's rate in the
step). ``wideqkv:lora`` (with ``--compile``): compiled layers' chains of three (q/k/v) stacked wide too
(:mod:`slimtune.core.wide_rows`, which stacks chains of two only: its docstring estimates that for three the
backward's extra ``[N, K]`` products cost about what the forward saves; never measured).

``--compile``: each decoder layer through ``torch.compile`` (``slimtune.models.layers.compile_layers``, which turns
the models' KV cache off), on both sides.

A configuration whose step runs out of GPU memory is dropped, with the round it failed in, and the others go on:
its model is freed, the table and the JSON lines name it, and the ratios are taken over the rounds every remaining
configuration ran (run 126 lost both sides' numbers to one side's out-of-memory error).

``--capture``: every configuration's step (PEFT's too) replayed as one CUDA graph through
:func:`slimtune.capture_step` (AdamW with ``capturable=True``, its constant learning rate): the host's launch cost
leaves the comparison, what remains is the GPU's work. The transient peak is then the capture's (its eager warm-up
steps and the captured one): a replay allocates nothing, the graph's memory pool holds what the capture did.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import statistics
import sys
import time
from typing import Any, Callable, Sequence

from _common import JsonlSink, environment_line, markdown_table, write_out_text

import torch

import slimtune
from slimtune.core import stacked_rows, wide_rows
from slimtune.core.inject import detach, install_frozen_lean_layers
from slimtune.core.siblings import watched_groups
from slimtune.core.stacked_rows import MEMBERS, LayerStacks, intact, stack, unstack_member
from slimtune.memory.chunked_loss import model_causal_lm_loss, plain_head
from slimtune.memory.options import ProfileOptions
from slimtune.memory.profile import LR, TrainingSession
from slimtune.models.diffusion import DIFFUSION_PRESETS
from slimtune.models.layers import compile_layers


def parse_config(text: str) -> tuple[str, str]:
    """``"loha"`` → slimtune LoHa; ``"peft-bf16:loha"`` → (backend, method); ``"before:loha"`` → the earlier copy's
    slimtune LoHa (backend ``before``)."""
    backend, _, method = text.rpartition(":")
    return (backend or "slimtune"), method


#: ``--strip-lean`` kinds: the instance ``forward`` classes of ``slimtune.core.lean_layers`` each removes
LEAN_KINDS = {"conv": ("_LeanConvForward",), "norm-silu": ("_LeanNormForward", "_LeanSiluForward"),
              "geglu": ("_LeanGegluForward",), "resnet": ("_LeanResnetForward",), "rmsnorm": ("_LeanRmsNormForward",),
              "mlp": ("_LeanMlpForward",), "attention": ("_AttentionForward",)}


def strip_lean(model: Any, kinds: Sequence[str]) -> int:
    """Give the modules of ``model`` whose lean ``forward`` is of ``kinds`` their class's forward back (``stripped``
    configurations: what each lean layer costs or saves in a step); returns how many."""
    names = {name for kind in kinds for name in LEAN_KINDS[kind]}
    stripped = [m for m in model.modules() if type(m.__dict__.get("forward")).__name__ in names]
    for module in stripped:
        del module.forward
    return len(stripped)


def strip_prepass(model: Any) -> int:
    """Take DoRA's step-vector pre-pass (``slimtune.methods.dora.prepass``) off ``model``: every DoRA layer forms its
    norm itself (``noprepass`` configurations: what the one launch per forward saves, step against step); returns
    how many hooks."""
    from slimtune.methods.dora.prepass import VectorPrepass

    hooks = [key for key, hook in model._forward_pre_hooks.items() if isinstance(hook, VectorPrepass)]
    for key in hooks:
        prepass = model._forward_pre_hooks.pop(key)
        for layer in prepass.layers:
            layer.prepass_slot.ticket = None
    return len(hooks)


def strip_siblings(model: Any) -> int:
    """Take the sibling groups (``slimtune.core.siblings``: q/k/v and gate/up as one Function) out of ``model``, so
    each LoRA layer runs alone (``alone`` configurations: what the fusion saves, step against step); returns how many
    layers."""
    members = [m for m in model.modules() if getattr(m, "siblings", None) is not None]
    for module in members:
        module.siblings = None
    return len(members)


def force_path(model: Any, path: str) -> int:
    """Set every LoHa / LoKr layer of ``model`` to one training path (``folded`` / ``structured`` configurations:
    the path chooser against each path everywhere); returns how many layers."""
    from slimtune.core.structured_adapter import StructuredAdapter

    layers = [m for m in model.modules() if isinstance(m, StructuredAdapter)]
    for layer in layers:
        layer.path = path
    return len(layers)


def floor_model(model: Any) -> torch.nn.Parameter:
    """Take ``model``'s adapters out, keep its frozen lean layers, and scale its input embeddings' output by one
    trainable scalar (``floor`` configurations), so that backward runs through every layer as it does with
    adapters; returns the scalar."""
    detach(model)
    install_frozen_lean_layers(model)
    embeddings = model.get_input_embeddings()
    gate = torch.nn.Parameter(torch.ones((), device=embeddings.weight.device, dtype=embeddings.weight.dtype))
    embeddings.register_forward_hook(lambda _module, _args, out: out * gate)
    return gate


def register_layers_preset(name: str, layers: int, before: bool) -> str:
    """Register ``name`` with ``layers`` decoder layers as a preset of this process (the earlier copy's too, where
    ``before``), and return its name (``--layers``)."""
    packages = ("slimtune", "slimtune_before") if before else ("slimtune",)
    new_name = f"{name}-{layers}-layers"
    for package in packages:
        presets = importlib.import_module(f"{package}.models.presets")
        base = presets.get_preset(name)
        if not isinstance(base, presets.ModelPreset):
            raise SystemExit(f"--layers takes a language-model preset, not {name!r}")
        preset = dataclasses.replace(base, name=new_name, num_hidden_layers=layers,
                                     description=f"{name} with {layers} decoder layers (paired_steps.py --layers)")
        presets.PRESETS[new_name] = presets.LLM_PRESETS[new_name] = preset
    return new_name


def compile_session(backend: str, model: Any) -> None:
    """``compile_layers`` on a configuration's model: the earlier copy's own for ``before`` configurations (its
    layers may learn or compile otherwise); ``unstacked`` configurations' layers then stack no chain,
    ``unstacked-one`` configurations' no chain of one, ``tritonproduct`` ones take their rows' forward products
    from Triton, and ``wideqkv`` ones stack their chains of three wide."""
    layers = importlib.import_module("slimtune_before.models.layers") if backend == "before" else None
    (layers.compile_layers if layers is not None else compile_layers)(model)
    if backend == "tritonproduct":
        print(f"{triton_products(model)} compiled layers take their products from Triton", flush=True)
    if backend == "wideqkv":
        print(f"{len([widen_triples(stacks) for stacks in compiled_stacks(model)])} compiled layers stack q/k/v wide",
              flush=True)
    if backend in ("unstacked", "unstacked-one"):
        limited = [limit_stacks(stacks, longest_unstacked=0 if backend == "unstacked" else 1)
                   for stacks in compiled_stacks(model)]
        print(f"{len(limited)} compiled layers stack no chain of {'any length' if backend == 'unstacked' else 'one'}",
              flush=True)


def triton_products(model: Any) -> int:
    """Make each compiled layer of ``model`` (one with sibling groups) trace its stacked rows' forward products
    through ``product_sum_kernel.scaled_product_op``: ``stacked_rows.scaled_product`` is that op while the layer's
    compiled forward runs (its graph is traced in its first call; Dynamo's guard on the name holds in later ones)."""
    import product_sum_kernel

    def triton_product(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
        return product_sum_kernel.scaled_product_op(a, b, alpha)

    wrappers = compiled_forwards(model)
    for wrapper in wrappers:
        def patched(*args: Any, compiled: Callable = wrapper.compiled, **kwargs: Any) -> Any:
            kept, stacked_rows.scaled_product = stacked_rows.scaled_product, triton_product
            try:
                return compiled(*args, **kwargs)
            finally:
                stacked_rows.scaled_product = kept
        wrapper.compiled = patched
    return len(wrappers)


def compiled_forwards(model: Any) -> list[Any]:
    """The forward of each layer of ``model`` that ``compile_layers`` compiled with sibling groups (each holds its
    layer's ``stacks`` and ``compiled`` forward)."""
    forwards = (m.__dict__.get("forward") for m in model.modules())
    return [f for f in forwards if isinstance(getattr(f, "stacks", None), LayerStacks)]


def compiled_stacks(model: Any) -> list[LayerStacks]:
    """The stacks of each layer of ``model`` that ``compile_layers`` compiled with sibling groups."""
    return [f.stacks for f in compiled_forwards(model)]


def limit_stacks(stacks: LayerStacks, longest_unstacked: int) -> LayerStacks:
    """Make a compiled layer's ``stacks`` leave every chain of at most ``longest_unstacked`` members unstacked (0:
    none stacked), each time it builds."""
    build = stacks.build

    def limited_build() -> None:
        if longest_unstacked == 0:
            stacks.heads = []
            return
        build()
        kept = []
        for first in stacks.heads:
            members = first.__dict__[MEMBERS].modules() or []
            if len(members) > longest_unstacked:
                kept.append(first)
            else:
                for member in members:
                    unstack_member(member)
        stacks.heads = kept

    stacks.build = limited_build
    return stacks


def widen_triples(stacks: LayerStacks) -> LayerStacks:
    """Make a compiled layer's ``stacks`` stack each chain of three members wide (``wide_rows.WIDE_MEMBERS`` is 3
    while it restacks them), each time it builds or restacks; the other chains as the library stacks them."""
    build, keep = stacks.build, stacks.keep

    def widen() -> None:
        for first in stacks.heads:
            members = first.__dict__[MEMBERS].modules() or []
            rows = stacked_rows.stacked_rows(first, 3)
            if len(members) != 3 or (rows is not None and rows.dim() == 1):
                continue
            kept, wide_rows.WIDE_MEMBERS = wide_rows.WIDE_MEMBERS, 3
            try:
                for member in members:
                    unstack_member(member)
                if not stack(members) or stacked_rows.stacked_rows(first, 3).dim() != 1:
                    raise SystemExit("wideqkv: a chain of three did not stack wide")
            finally:
                wide_rows.WIDE_MEMBERS = kept

    def widened_build() -> None:
        build()
        widen()

    def widened_keep() -> None:  # runs before every call: widen only where keep restacks (its own first check)
        if not all(intact(first) for first in stacks.heads):
            keep()
            widen()

    stacks.build, stacks.keep = widened_build, widened_keep
    return stacks


def session_for(backend: str, method: str, common: dict[str, Any], memory: str = "fast",
                strip: Sequence[str] = ()) -> Any:
    """A prepared training session: this checkout's, or (``before``) the earlier copy's, or (``stripped``) this
    checkout's with the lean layers of ``strip`` removed; ``memory`` is slimtune's setting (PEFT's models are built
    as PEFT builds them)."""
    if backend == "alone":
        session = session_for("slimtune", method, common, memory)
        print(f"{strip_siblings(session.model)} LoRA layers run alone (no sibling fusion)", flush=True)
        return session
    if backend == "noprepass":
        session = session_for("slimtune", method, common, memory)
        print(f"{strip_prepass(session.model)} DoRA pre-pass hook(s) removed", flush=True)
        return session
    if backend in ("folded", "structured"):
        session = session_for("slimtune", method, common, memory)
        print(f"{force_path(session.model, backend)} layers on the {backend} path", flush=True)
        return session
    if backend in ("unstacked", "unstacked-one", "tritonproduct", "wideqkv"):  # set once compiled (compile_session)
        return session_for("slimtune", method, common, memory)
    if backend == "floor":
        session = session_for("slimtune", method, common, memory)
        session.trainable = [floor_model(session.model)]
        session.optimizer = torch.optim.AdamW(session.trainable, lr=LR)
        print("adapters taken out, one scalar trained (the floor)", flush=True)
        return session
    if backend == "trainloss":
        session = session_for("slimtune", method, common, memory)
        if not plain_head(session.model):
            raise SystemExit(f"trainloss:{method}: the model has no plain head, slimtune train takes its logits' loss")
        ids, labels = session.inputs["input_ids"], session.inputs["labels"]
        session._forward = lambda: (model_causal_lm_loss(session.model, ids, labels, "mean"), None)
        return session
    if backend == "stacked":
        session = session_for("slimtune", method, common, memory)
        session.train_step()  # the sibling groups learn their chains
        stacks = LayerStacks(watched_groups(session.model))
        stacks.build()
        print(f"{len(stacks.heads)} chains stacked, eager steps too", flush=True)
        return session
    if backend == "stripped":
        session = session_for("slimtune", method, common, memory)
        print(f"stripped {strip_lean(session.model, strip)} lean layers ({', '.join(strip)})", flush=True)
        return session
    if backend == "before":
        options_cls = importlib.import_module("slimtune_before.memory.options").ProfileOptions
        session_cls = importlib.import_module("slimtune_before.memory.profile").TrainingSession
        return session_cls.prepare(options_cls(method=method, backend="slimtune", release_outputs=True,
                                               memory=memory, **common))
    return TrainingSession.prepare(ProfileOptions(method=method, backend=backend, release_outputs=True,
                                                  memory=memory if backend == "slimtune" else "fast", **common))


def captured(session: Any) -> tuple[Callable[[], torch.Tensor], int]:
    """The session's step as a CUDA graph replay (:func:`slimtune.capture_step`; its optimizer becomes a
    capturable AdamW), and the transient peak of its capture (bytes: its eager warm-up steps and the captured one;
    a replay allocates nothing, its graph's pool holds what the capture did)."""
    session.optimizer = torch.optim.AdamW(session.trainable, lr=LR, capturable=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()

    def loss_fn(_batch: Any) -> torch.Tensor:  # the session's own inputs never change: they are the static batch
        with session.attention():
            return session._forward()[0]

    step = slimtune.capture_step(session.model, session.optimizer, loss_fn, session.inputs, fixed_lr=True)
    torch.cuda.synchronize()
    return (lambda: step(session.inputs)), torch.cuda.max_memory_allocated() - before


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["lora", "loha", "lokr", "peft-bf16:loha", "peft-bf16:lokr"],
                        help="[backend:]method, the first is the yardstick (default: slimtune LoRA first)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3, help="rounds not timed")
    parser.add_argument("--steps-per-turn", type=int, default=1, metavar="K",
                        help="consecutive steps of one configuration per turn (default 1); with K > 1 the first "
                             "step of a turn is untimed (it runs on caches the other configurations left) and the "
                             "turn's time is the mean of the other K - 1, as one model's training loop runs")
    parser.add_argument("--quick", action="store_true", help="tiny-llama on the CPU (smoke test)")
    parser.add_argument("--cpu", action="store_true",
                        help="--preset on the CPU in float32, one thread (a host-cost proxy with a tiny preset, e.g. "
                             "tiny-sd15, SD-1.5's layout at tiny widths: the arithmetic is small, the Python and "
                             "dispatch per module are the model's)")
    parser.add_argument("--cpu-native-conv", action="store_true",
                        help="with --cpu: torch.backends.mkldnn off, so every convolution takes PyTorch's own CPU "
                             "path (oneDNN costs ~40 µs a call above batch 1 against ~7 µs at batch 1, which "
                             "overstates LoKr's batched convolutions against PEFT's batch-1 ones; RESULTS run 101)")
    parser.add_argument("--unet-lean-bytes", type=int, default=None, metavar="N",
                        help="a UNet's lean layers from N bytes (slimtune.core.lean_layers.UNET_LEAN_BYTES; with "
                             "--cpu --preset tiny-sd15, 2048 makes the two finest levels lean, as 4 MiB does SD-1.5's)")
    parser.add_argument("--before-unet-lean-bytes", type=int, default=None, metavar="N",
                        help="the earlier copy's UNet lean threshold alone (after --unet-lean-bytes): with --before "
                             "DIR holding this checkout's own package, an A/B of the threshold in paired rounds")
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--preset", default="llama-3.2-3b",
                        help="the model (a profiler preset: stable-diffusion-1.5 for the UNet, at its own batch 4, "
                             "64x64 latents and 77 tokens)")
    parser.add_argument("--layers", type=int, default=None, metavar="N",
                        help="the language-model preset with N decoder layers (e.g. --preset tiny-llama --layers 28 "
                             "--seq 16 --batch 1: the 3B model's layer count at widths whose kernels are too small to "
                             "bound the step, so a GPU step times the host's work)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--batch", type=int, default=None, help="default: 4, or the preset's own")
    parser.add_argument("--quant", default="none", choices=("none", "nf4"),
                        help="nf4: every configuration's frozen base weights in 4-bit NF4 (QLoRA: slimtune.quantize, "
                             "bitsandbytes for PEFT)")
    parser.add_argument("--memory", default="fast", choices=("fast", "balanced", "max-fit"),
                        help="slimtune's memory setting for its configurations")
    parser.add_argument("--strip-lean", nargs="+", default=["conv", "norm-silu", "geglu", "resnet"],
                        choices=list(LEAN_KINDS),
                        help="the lean layers the configurations stripped:METHOD run without (with --memory fast)")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="gc.freeze() once the models are built (their objects out of the collector's scans)")
    parser.add_argument("--before", default=None, metavar="DIR",
                        help="a directory holding an earlier copy of the package as slimtune_before (before:METHOD)")
    parser.add_argument("--out-name", default=None, help="$OUT file stem (default: paired_steps)")
    parser.add_argument("--compile", action="store_true",
                        help="every configuration's decoder layers through torch.compile (slimtune.models.layers."
                             "compile_layers: regional, PEFT's models too); the warm-up rounds hold the compile time")
    parser.add_argument("--capture", action="store_true",
                        help="every configuration's step replayed as a CUDA graph (slimtune.capture_step)")
    parser.add_argument("--timed", action="store_true",
                        help="slimtune's variant choosers timed once per shape (slimtune.set_variant_criterion"
                             "('timed')) instead of counting FLOPs; measured in the warm-up rounds")
    args = parser.parse_args(argv)
    if any(parse_config(c)[0] == "stripped" for c in args.configs) and args.memory != "fast":
        parser.error("stripped:METHOD removes lean layers after building: only with --memory fast")
    if args.steps_per_turn < 1:
        parser.error("--steps-per-turn needs at least 1")
    if args.compile and len(args.configs) > 4:  # two graphs a model (the first layer's input needs no gradient)
        parser.error("--compile takes at most 4 configurations: each model's layers compile to 2 graphs of one code "
                     "object, and past Dynamo's default recompile limit of 8 the later models would run eagerly")
    if args.capture and (args.quick or args.cpu):
        parser.error("--capture replays CUDA graphs: not on the CPU (--quick, --cpu)")
    if args.cpu_native_conv and not args.cpu:
        parser.error("--cpu-native-conv is for --cpu")
    if args.cpu:
        torch.set_num_threads(1)
    if args.cpu_native_conv:
        torch.backends.mkldnn.enabled = False
    if args.before:
        sys.path.insert(0, args.before)
    if args.unet_lean_bytes is not None:  # the earlier copy's too, where it has the setting
        for package in ("slimtune", "slimtune_before") if args.before else ("slimtune",):
            module = importlib.import_module(f"{package}.core.lean_layers")
            if hasattr(module, "UNET_LEAN_BYTES"):
                module.UNET_LEAN_BYTES = args.unet_lean_bytes
    if args.before_unet_lean_bytes is not None:
        if not args.before:
            parser.error("--before-unet-lean-bytes needs --before")
        importlib.import_module("slimtune_before.core.lean_layers").UNET_LEAN_BYTES = args.before_unet_lean_bytes
    if args.timed:
        slimtune.set_variant_criterion("timed")
    if args.layers is not None:
        args.preset = register_layers_preset(args.preset, args.layers, bool(args.before))
    common = (dict(preset="tiny-llama", rank=8, batch=2, seq=args.seq or 64, device="cpu", dtype="float32")
              if args.quick else
              dict(preset=args.preset, rank=args.rank, batch=args.batch or (4 if "llama" in args.preset else None),
                   seq=args.seq or 512, device="cpu" if args.cpu else "cuda",
                   dtype="float32" if args.cpu else "bfloat16"))
    if args.quant != "none":
        common["quant"] = args.quant
    print(environment_line(), flush=True)
    sessions = []
    steps: dict[str, Callable[[], torch.Tensor]] = {}
    capture_peaks: dict[str, int] = {}  # --capture: each configuration's transient peak, from its capture
    for text in args.configs:
        backend, method = parse_config(text)
        session = session_for(backend, method, common, args.memory, args.strip_lean)
        if args.compile:
            compile_session(backend, session.model)
        if args.capture:
            steps[text], capture_peaks[text] = captured(session)
        else:
            steps[text] = session.train_step
        sessions.append((text, session))
        print(f"built {text}", flush=True)
    if args.gc_freeze:
        gc.collect()
        gc.freeze()
    cuda = common["device"] == "cuda"
    times: dict[str, list[float]] = {name: [] for name, _ in sessions}
    peaks: dict[str, list[int]] = {name: [] for name, _ in sessions}
    losses: dict[str, list[float]] = {name: [] for name, _ in sessions}
    out_of_memory: dict[str, str] = {}  # configurations dropped, each with where its step ran out of memory
    for round_index in range(args.warmup + args.rounds):
        shift = round_index % len(sessions)  # each configuration takes each position in turn (no position bias)
        for name, session in sessions[shift:] + sessions[:shift]:
            if name in out_of_memory:
                continue
            if cuda:
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            turn = []
            try:
                for _ in range(args.steps_per_turn):
                    t0 = time.perf_counter()
                    loss = steps[name]()
                    if cuda:
                        torch.cuda.synchronize()
                    turn.append(time.perf_counter() - t0)
                    losses[name].append(float(loss))  # after the timing: reading it back waits for nothing more
            except torch.OutOfMemoryError as error:
                out_of_memory[name] = (f"out of memory in round {round_index + 1} "
                                       f"({'warm-up' if round_index < args.warmup else 'timed'}): "
                                       f"{str(error).splitlines()[0][:200]}")
                print(f"{name}: {out_of_memory[name]}; the other configurations go on", flush=True)
                continue
            if round_index >= args.warmup:  # a turn of several steps: the first warms the caches, the rest are timed
                times[name].append(statistics.fmean(turn[1:] or turn))
                if cuda:
                    peaks[name].append(capture_peaks[name] if args.capture
                                       else torch.cuda.max_memory_allocated() - before)
        if out_of_memory.keys() & dict(sessions).keys():  # the dropped models' memory back for the others
            sessions = [(name, session) for name, session in sessions if name not in out_of_memory]
            steps = {name: step for name, step in steps.items() if name not in out_of_memory}
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        if not sessions:
            break
    out_name = args.out_name or ("paired_steps_gc-freeze" if args.gc_freeze else "paired_steps")
    sink = JsonlSink(f"{out_name}.jsonl")
    for name, reason in out_of_memory.items():
        sink.write({"config": name, "out_of_memory": reason, **common})
    if not sessions:
        print("every configuration ran out of memory", flush=True)
        return 1
    # the paired rounds are those every remaining configuration ran (a configuration dropped in a timed round
    # leaves its earlier rounds out of the comparison)
    paired = min(len(t) for name, t in times.items() if name not in out_of_memory)
    times = {name: t[:paired] for name, t in times.items() if name not in out_of_memory}
    yardstick = sessions[0][0]
    rows = []
    for name, _ in sessions:
        ratios = [t / y for t, y in zip(times[name], times[yardstick])]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        peft = f"peft-bf16:{parse_config(name)[1]}"  # the same method in PEFT with bf16 adapters, when run
        vs_peft = (statistics.median(t / p for t, p in zip(times[name], times[peft]))
                   if peft in times and peft != name else None)
        before_name = f"before:{parse_config(name)[1]}"  # the earlier copy's same method, when run
        vs_before = (statistics.median(t / b for t, b in zip(times[name], times[before_name]))
                     if before_name in times and before_name != name else None)
        peak = max(peaks[name]) if peaks[name] else None
        peak_before = max(peaks[before_name]) if vs_before is not None and peaks[before_name] else None
        loss_diff = (max(abs(a - b) for a, b in zip(losses[name], losses[before_name]))
                     if vs_before is not None else None)
        sink.write({"config": name, "yardstick": yardstick, "step_times_s": [round(t, 6) for t in times[name]],
                    "median_s": statistics.median(times[name]), "ratio_median": statistics.median(ratios),
                    "ratio_quartiles": [q[0], q[2]], "ratio_to_peft_bf16_median": vs_peft,
                    "ratio_to_before_median": vs_before, "transient_peak_bytes": peak, "losses": losses[name],
                    "max_abs_loss_diff_to_before": loss_diff, **common})
        rows.append([name, f"{statistics.median(times[name]):.4f}", f"{min(times[name]):.4f}",
                     f"{statistics.median(ratios):.3f}", f"{q[0]:.3f}-{q[2]:.3f}",
                     "" if vs_peft is None else f"{vs_peft:.3f}", "" if vs_before is None else f"{vs_before:.3f}",
                     "" if peak is None else f"{peak / 2**30:.3f}",
                     "" if peak_before is None else f"{peak / peak_before:.4f}",
                     "" if loss_diff is None else f"{loss_diff:.2e}"])
    rows += [[name, reason, *[""] * 8] for name, reason in out_of_memory.items()]
    table = markdown_table(["config", "median s", "fastest s", f"÷ {yardstick} (median of paired rounds)",
                            "interquartile", "÷ peft-bf16, same method (median of paired rounds)",
                            "÷ before, same method (median of paired rounds)", "step transient peak GiB",
                            "peak ÷ before", "max |loss − before's| over all steps"], rows)
    batch = common["batch"] or "the preset's"
    shape = (f"batch {batch} (its latents and text tokens)" if common["preset"] in DIFFUSION_PRESETS
             else f"batch {batch}, seq {common['seq']}")
    base = " (NF4 base weights)" if args.quant == "nf4" else ""
    text = (f"{environment_line()}\n\n{common['preset']}{base}, r={common['rank']}, {shape}, {common['dtype']}; "
            f"{args.rounds} paired rounds after {args.warmup} warm-up rounds, "
            f"{'one step' if args.steps_per_turn == 1 else f'{args.steps_per_turn} steps (the first untimed)'} "
            f"of each configuration per round, logits released before backward; slimtune memory="
            f"{args.memory}"
            f"{'; gc.freeze() after building' if args.gc_freeze else ''}"
            f"{'; oneDNN off (PyTorch’s own CPU convolutions)' if args.cpu_native_conv else ''}"
            f"{f'; UNet lean threshold {args.unet_lean_bytes} bytes' if args.unet_lean_bytes is not None else ''}"
            f"{f', before {args.before_unet_lean_bytes} bytes' if args.before_unet_lean_bytes is not None else ''}"
            f"{'; decoder layers through torch.compile' if args.compile else ''}"
            f"{'; each step replayed as a CUDA graph (slimtune.capture_step)' if args.capture else ''}"
            f"{'; variants timed once per shape (slimtune.set_variant_criterion)' if args.timed else ''}\n\n{table}\n")
    print("\n" + text, flush=True)
    write_out_text(f"{out_name}.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
