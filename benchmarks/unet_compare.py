"""Stable-Diffusion-1.5-shaped UNet: conv LoHa / LoKr (and LoCon for reference), slimtune vs PEFT.

Protocol: diffusers ``UNet2DConditionModel`` with SD-1.5's configuration (from ``slimtune.models.diffusion`` when
that module has the preset, else the same dict inline: block_out_channels (320, 640, 1280, 1280),
layers_per_block 2, cross_attention_dim 768, attention_head_dim 8, sample_size 64, 4 in/out channels,
CrossAttnDownBlock2D x3 + DownBlock2D, UpBlock2D + CrossAttnUpBlock2D x3), random weights, built on the device
and cast to bf16. The adapter goes on the modules LyCORIS users target on SD (``TARGETS``: the attention
projections, the Transformer2D ``proj_in``/``proj_out`` (1x1 convolutions in SD-1.5), the feed-forward Linears,
the ResNet ``conv1``/``conv2``/``conv_shortcut`` and ``time_emb_proj``). One step: batch 4, latents
``[4, 4, 64, 64]``, random timesteps, a random text context ``[4, 77, 768]`` (no text encoder), loss
``mse(pred.float(), noise.float())``, ``backward``, AdamW(lr=1e-4) on the trainable parameters,
``zero_grad(set_to_none=True)``. ``--steps`` steps (default 8); step time = median of the steps after the first 3
(CUDA-synchronised wall clock); peak = ``torch.cuda.max_memory_allocated()`` over the steps, after
``reset_peak_memory_stats`` once model, adapter, optimizer and inputs exist.

Backends: ``slimtune``; ``peft`` (``get_peft_model``, adapter weights upcast to float32, as users get it);
``peft-bf16`` (``autocast_adapter_dtype=False``). Methods: ``loha`` and ``lokr`` (their conv forms on the
convolutions; ``--effective-conv`` for the Tucker / ``use_effective_conv2d`` variants), ``locon`` (LoRA on the
same targets). Every configuration runs in its own process (this script with ``--child``), one after another;
``--rounds N`` interleaves N rounds (median step time, largest peak).

Results: one JSON line per process in ``$OUT/unet_compare<tag>.jsonl`` and the markdown table in
``$OUT/unet_compare<tag>.md`` (``$OUT`` defaults to ``./out``; the tag names a non-default method set,
``_effconv``, ``_tiny``); the table on stdout. ``--tiny``: a tiny UNet on the
CPU in float32, every configuration in this one process (smoke test; no peak-memory figure).

    python benchmarks/unet_compare.py                      # GPU: 9 processes
    python benchmarks/unet_compare.py --methods loha lokr  # GPU: 6 processes, files unet_compare_loha-lokr.*
    python benchmarks/unet_compare.py --tiny               # CPU smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from _common import (REPO_ROOT, JsonlSink, environment_line, fmt_ratio, markdown_table, package_version,
                     write_out_text)

METHODS = ("loha", "lokr", "locon")
BACKENDS = ("slimtune", "peft", "peft-bf16")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
           "conv1", "conv2", "conv_shortcut", "time_emb_proj"]
GIB = 2**30
WARMUP = 3

SD15_UNET: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
TINY_UNET: dict[str, Any] = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)


def unet_config(tiny: bool) -> tuple[dict[str, Any], str]:
    """The UNet's constructor arguments and where they came from (slimtune's preset, or the inline copy)."""
    name = "tiny-unet" if tiny else "stable-diffusion-1.5"
    try:
        from slimtune.models.diffusion import DIFFUSION_PRESETS

        return dict(DIFFUSION_PRESETS[name].config), f"slimtune.models.diffusion preset {name!r}"
    except (ImportError, KeyError, AttributeError):
        return dict(TINY_UNET if tiny else SD15_UNET), f"inline {name} config"


# -- one configuration (child process) ------------------------------------------------------------------
def adapter_config(method: str, backend: str, rank: int, alpha: float, targets: list[str], effective_conv: bool):
    """slimtune's or PEFT's config for ``method`` (the same modules, rank, alpha and conv variant)."""
    if backend == "slimtune":
        import slimtune

        if method == "locon":
            return slimtune.LoraConfig(r=rank, alpha=alpha, target_modules=targets)
        cls = slimtune.LohaConfig if method == "loha" else slimtune.LokrConfig
        return cls(r=rank, alpha=alpha, target_modules=targets, use_effective_conv2d=effective_conv)
    import peft

    alpha = int(alpha) if float(alpha).is_integer() else alpha
    if method == "locon":
        return peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)
    cls = peft.LoHaConfig if method == "loha" else peft.LoKrConfig
    return cls(r=rank, alpha=alpha, target_modules=targets, use_effective_conv2d=effective_conv)


def apply_adapter(unet, cfg: dict[str, Any]) -> int:
    """Adapt ``unet`` in place; returns the number of adapted layers."""
    config = adapter_config(cfg["method"], cfg["backend"], cfg["rank"], cfg["alpha"], cfg["targets"],
                            cfg["effective_conv"])
    if cfg["backend"] == "slimtune":
        import slimtune

        slimtune.adapt(unet, config)
        return len(slimtune.adapter_modules(unet))
    import peft
    from peft.tuners.tuners_utils import BaseTunerLayer

    peft.get_peft_model(unet, config, autocast_adapter_dtype=cfg["backend"] == "peft")  # injects in place
    return sum(isinstance(m, BaseTunerLayer) for m in unet.modules())


def run_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Build, adapt and train ``cfg["steps"]`` steps; the measurements as a JSON-able dict."""
    import torch
    import torch.nn.functional as F

    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # not the "modules to keep in float32" note on .to(dtype)
    device, dtype = torch.device(cfg["device"]), getattr(torch, cfg["dtype"])
    cuda = device.type == "cuda"
    result: dict[str, Any] = {k: cfg[k] for k in ("method", "backend", "rank", "alpha", "batch", "steps",
                                                  "effective_conv", "tiny")}
    result.update(status="ok", error=None, step_time_s=None, peak_bytes=None)
    try:
        unet_kwargs, source = unet_config(cfg["tiny"])
        result["unet_config"] = source
        torch.manual_seed(0)
        with torch.device(device):
            unet = diffusers.UNet2DConditionModel(**unet_kwargs)
        unet.to(dtype).train()
        result["base_params"] = sum(p.numel() for p in unet.parameters())
        result["adapted_layers"] = apply_adapter(unet, cfg)
        trainable = [p for p in unet.parameters() if p.requires_grad]
        result["trainable_params"] = sum(p.numel() for p in trainable)
        result["adapter_dtypes"] = sorted({str(p.dtype).removeprefix("torch.") for p in trainable})
        opt = torch.optim.AdamW(trainable, lr=1e-4)
        gen = torch.Generator(device=device).manual_seed(1)
        res, batch = int(unet_kwargs["sample_size"]), cfg["batch"]
        sample = torch.randn(batch, unet_kwargs["in_channels"], res, res, device=device, dtype=dtype, generator=gen)
        noise = torch.randn(batch, unet_kwargs["out_channels"], res, res, device=device, dtype=dtype, generator=gen)
        text = torch.randn(batch, 77, unet_kwargs["cross_attention_dim"], device=device, dtype=dtype, generator=gen)
        timestep = torch.randint(0, 1000, (batch,), device=device, generator=gen)
        if cuda:
            torch.cuda.synchronize(device)
            result["memory_after_setup_bytes"] = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(cfg["steps"]):
            t0 = time.perf_counter()
            pred = unet(sample, timestep, encoder_hidden_states=text).sample
            loss = F.mse_loss(pred.float(), noise.float())
            del pred
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        result["step_times_s"] = times
        result["step_time_s"] = statistics.median(times[WARMUP:] if len(times) > WARMUP else times[1:] or times)
        result["loss"] = float(loss)
    except torch.OutOfMemoryError as exc:
        result.update(status="OOM", error=str(exc)[:300])
    except Exception as exc:  # noqa: BLE001 - reported, the parent goes on with the next configuration
        result.update(status="error", error=f"{type(exc).__name__}: {exc}"[-1500:])
    if cuda:
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return result


# -- the driver (parent process) -------------------------------------------------------------------------
def run_child(cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(cfg)],
                              capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {**cfg, "status": "timeout", "error": f"no result after {timeout:g} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {**cfg, "status": "error", "error": (proc.stderr or proc.stdout)[-1500:] or f"exit {proc.returncode}"}


def merge_rounds(results: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """One result per (method, backend): median step time over the rounds, largest peak; a failure wins."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["method"], r["backend"]), []).append(r)
    merged = {}
    for key, runs in groups.items():
        bad = [r for r in runs if r.get("status") != "ok"]
        if bad:
            merged[key] = bad[0]
            continue
        peaks = [r["peak_bytes"] for r in runs if r.get("peak_bytes") is not None]
        merged[key] = {**runs[0], "step_time_s": statistics.median(r["step_time_s"] for r in runs),
                       "peak_bytes": max(peaks) if peaks else None}
    return merged


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summary_table(merged: dict[tuple[str, str], dict[str, Any]], methods: Sequence[str]) -> str:
    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return ""
        if r.get("status") != "ok":
            peak = f" (peak {r['peak_bytes'] / GIB:.2f})" if r.get("peak_bytes") else ""
            return f"{r.get('status')}{peak}"
        peak = "—" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / GIB:.2f}"
        return f"{peak} / {r['step_time_s']:.3f}"

    def rat(ours: dict | None, other: dict | None, field: str) -> str:
        if not ours or not other or ours.get("status") != "ok" or other.get("status") != "ok":
            return "—"
        return fmt_ratio(_ratio(ours.get(field), other.get(field)))

    rows = []
    for method in methods:
        ours, default, bf16 = (merged.get((method, b)) for b in BACKENDS)
        layers = {str(r.get("adapted_layers")) for r in (ours, default, bf16) if r and r.get("adapted_layers")}
        params = {str(r.get("trainable_params")) for r in (ours, default, bf16) if r and r.get("trainable_params")}
        rows.append([method, cell(ours), cell(default), cell(bf16), rat(ours, default, "peak_bytes"),
                     rat(ours, bf16, "peak_bytes"), rat(ours, default, "step_time_s"), rat(ours, bf16, "step_time_s"),
                     " vs ".join(sorted(layers)), " vs ".join(sorted(params))])
    header = ["method", "slimtune GB / s", "PEFT default GB / s", "PEFT bf16 GB / s", "peak ÷ default",
              "peak ÷ bf16", "step ÷ default", "step ÷ bf16", "adapted layers", "trainable params"]
    return markdown_table(header, rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help="a tiny UNet on the CPU, float32 (smoke test)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=None, help="default: the rank (scaling 1)")
    parser.add_argument("--effective-conv", action="store_true",
                        help="use_effective_conv2d (Tucker LoHa/LoKr on kernels > 1) for both libraries")
    parser.add_argument("--targets", nargs="+", default=TARGETS)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of processes (CPU-speed drift)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per process")
    parser.add_argument("--in-process", action="store_true",
                        help="run every configuration in this process (no clean peaks; the default with --tiny, "
                        "where importing diffusers and peft in every process would dominate)")
    args = parser.parse_args(argv)
    args.in_process = args.in_process or args.tiny
    defaults = (dict(batch=1, steps=4, device="cpu", dtype="float32") if args.tiny else
                dict(batch=4, steps=8, device="cuda", dtype="bfloat16"))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.alpha is None:
        args.alpha = float(args.rank)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_config(json.loads(args.child))), flush=True)
        return 0
    os.environ.setdefault("OUT", "out")
    configs = [dict(method=m, backend=b, rank=args.rank, alpha=args.alpha, targets=args.targets, batch=args.batch,
                    steps=args.steps, device=args.device, dtype=args.dtype, effective_conv=args.effective_conv,
                    tiny=args.tiny) for m in args.methods for b in args.backends]
    env = f"{environment_line()} · diffusers {package_version('diffusers')}"
    source = unet_config(args.tiny)[1]
    print(env, flush=True)
    print(f"{len(configs) * args.rounds} processes: UNet from the {source}, r={args.rank} alpha={args.alpha:g}, "
          f"batch {args.batch}, {args.steps} steps, {args.dtype}", flush=True)
    tag = "" if list(args.methods) == list(METHODS) else "_" + "-".join(args.methods)
    tag += ("_effconv" if args.effective_conv else "") + ("_tiny" if args.tiny else "")
    sink = JsonlSink(f"unet_compare{tag}.jsonl")
    results, t0 = [], time.perf_counter()
    for cfg in configs * args.rounds:
        result = run_config(cfg) if args.in_process else run_child(cfg, args.timeout)
        result.pop("targets", None)
        sink.write(result)
        results.append(result)
        peak = "—" if result.get("peak_bytes") is None else f"{result['peak_bytes'] / GIB:.2f} GB"
        step = "—" if result.get("step_time_s") is None else f"{result['step_time_s']:.4f} s"
        error = f"  ({result['error'][-300:]})" if result.get("error") else ""
        print(f"[{time.perf_counter() - t0:6.1f} s] {result['method']:<5} {result['backend']:<9} "
              f"{result.get('status', '?'):<7} peak {peak:>10}  step {step:>10}  layers "
              f"{result.get('adapted_layers', '—')}  trainable {result.get('trainable_params', '—')}{error}",
              flush=True)
    table = summary_table(merge_rounds(results), args.methods)
    header = (f"UNet2DConditionModel ({source}), random weights, {args.dtype}, batch {args.batch}, "
              f"{'16x16' if args.tiny else '64x64'} latents, text context [{args.batch}, 77, cross_attention_dim]; "
              f"r={args.rank}, alpha={args.alpha:g}{', use_effective_conv2d' if args.effective_conv else ''}; "
              f"targets {', '.join(args.targets)}; AdamW, {args.steps} steps (median after {WARMUP}), "
              f"{args.rounds} round(s); cells: peak GB (GiB) / s per step; ratios: slimtune ÷ PEFT "
              "(issue 5 target: conv LoHa/LoKr peak ÷ PEFT bf16 ≤ 0.8)")
    text = f"{env}\n\n{header}\n\n{table}\n"
    print("\n" + text, flush=True)
    write_out_text(f"unet_compare{tag}.md", text)
    return 0 if all(r.get("status") == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
