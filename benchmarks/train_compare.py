"""``slimtune train`` against Hugging Face Trainer + PEFT on the same data and settings: tokens/s and peak memory.

Both train LoRA (r=16, alpha=16, the seven Llama projections) on the Llama-3.2-3B shape (preset ``llama-3.2-3b``,
random weights built by ``slimtune.models.presets.build_model`` with the same seed, bf16) for the same steps on the
same rows: a JSONL file of samples that each fill one row of ``--seq`` tokens exactly (BOS + random lowercase bytes +
EOS through slimtune's byte-level tokenizer), so neither side pads or packs. Settings shared: global batch
``--batch`` (one micro-batch, no accumulation), AdamW at lr 2e-4, weight decay 0, cosine schedule without warm-up,
gradient clipping at 1.0, no gradient checkpointing unless ``--grad-ckpt`` (both then), bf16 weights and adapters:

* slimtune: ``python -m slimtune train --preset ... --data rows.jsonl`` (its own loop: adapters in the base dtype,
  the causal-LM loss without full logits, checkpoints off but the final one);
* Trainer + PEFT: ``get_peft_model(model, LoraConfig(...), autocast_adapter_dtype=False)`` (bf16 adapters, as
  slimtune's), ``transformers.Trainer`` with its defaults otherwise (``adamw_torch_fused``), the same rows as
  ``input_ids`` = ``labels``, shuffled by its own sampler (all rows cost the same).

Each side runs in its own process, one after the other. Throughput: tokens of the steps after the first
``--warmup`` (default 3) divided by their wall time (step ends are timed after a device synchronisation: Trainer in
a callback, slimtune from its per-step log, whose loss read synchronises); peak:
``torch.cuda.max_memory_allocated()`` over the whole run (on the CPU, ``--quick``: the process's peak RSS).

Output: a markdown table on stdout and, with ``$OUT`` set, ``$OUT/train_compare.jsonl`` (one JSON line per side) and
``$OUT/train_compare.md``. Goal (issue 16): slimtune >= 1.2x the tokens/s at <= 0.8x the peak memory.

    python benchmarks/train_compare.py                 # one GPU (H200/H100), Llama-3.2-3B shape, seq 2048
    python benchmarks/train_compare.py --quick         # CPU smoke test: tiny-llama, seq 128
    python benchmarks/train_compare.py --compile --trainer-compile   # both sides through torch.compile
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from _common import REPO_ROOT, JsonlSink, environment_line, fmt_ratio, markdown_table, write_out_text

GIB = 2**30


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny-llama on the CPU, seq 128 (smoke test)")
    parser.add_argument("--preset", default=None, help="default: llama-3.2-3b (tiny-llama with --quick)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per row (default: 2048; 128 with --quick)")
    parser.add_argument("--batch", type=int, default=None, help="rows per step (default: 4; 2 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 20; 6 with --quick)")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the throughput (default: 3)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing on both sides")
    parser.add_argument("--compile", action="store_true",
                        help="slimtune train --compile (each layer through torch.compile); the first --warmup "
                             "steps hold the compile time and are not counted")
    parser.add_argument("--trainer-compile", action="store_true",
                        help="Trainer's torch_compile=True (the whole PEFT model through torch.compile)")
    parser.add_argument("--sides", nargs="+", default=["slimtune", "trainer"], choices=("slimtune", "trainer"))
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per side (default: 1800)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # "trainer": run that side here
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.preset = args.preset or ("tiny-llama" if args.quick else "llama-3.2-3b")
    args.seq = args.seq or (128 if args.quick else 2048)
    args.batch = args.batch or (2 if args.quick else 4)
    args.steps = args.steps or (6 if args.quick else 20)
    args.device = "cpu" if args.quick else "cuda"
    args.dtype = "float32" if args.quick else "bfloat16"
    if args.steps <= args.warmup:
        parser.error("--steps must be larger than --warmup")
    return args


def write_rows(path: Path, rows: int, seq: int, seed: int = 0) -> Path:
    """``rows`` samples of ``seq - 2`` random lowercase letters: with the byte tokenizer's BOS and EOS each is one
    full row of ``seq`` tokens."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    with path.open("w", encoding="utf-8") as fh:
        for _ in range(rows):
            fh.write(json.dumps({"text": "".join(rng.choices(letters, k=seq - 2))}) + "\n")
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def throughput(ends: Sequence[float], tokens_per_step: int, warmup: int) -> float:
    """Tokens per second over the steps after ``warmup``, from the wall-clock times step ends were seen."""
    span = ends[-1] - ends[warmup - 1] if warmup > 0 else ends[-1]
    return tokens_per_step * (len(ends) - warmup) / span


# -- slimtune ---------------------------------------------------------------------------------------
def run_slimtune(args: argparse.Namespace, data: Path, work: Path) -> dict[str, Any]:
    out = work / "slimtune-out"
    cmd = [sys.executable, "-m", "slimtune", "train", "--preset", args.preset, "--data", str(data), "--out", str(out),
           "--seq", str(args.seq), "--batch", str(args.batch), "--max-steps", str(args.steps), "--rank",
           str(args.rank), "--alpha", str(args.rank), "--lr", "2e-4", "--save-every", "0", "--log-every", "1",
           "--device", args.device, "--dtype", args.dtype, "--json", *(["--grad-ckpt"] if args.grad_ckpt else []),
           *(["--compile"] if args.compile else [])]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode:
        return {"side": "slimtune", "status": "failed", "error": proc.stderr[-2000:]}
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    summary = events[-1]
    steps = [e for e in events if e["event"] == "step"]
    ends = [e["elapsed_s"] for e in steps]
    return {"side": "slimtune", "status": "ok", "tokens_per_s": throughput(ends, args.batch * args.seq, args.warmup),
            "peak_bytes": summary["peak_mem_bytes"], "memory_kind": summary["memory_kind"],
            "final_loss": summary["final_loss"], "step_times_s": [round(b - a, 4) for a, b in zip([0.0] + ends, ends)]}


# -- Trainer + PEFT (the child process) --------------------------------------------------------------
def trainer_child(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from slimtune.models.presets import LLAMA_TARGETS, build_model
    from slimtune.models.jsonl import read_jsonl
    from slimtune.train.data import ByteTokenizer, causal_lm_rows

    device = torch.device(args.device)
    rows = causal_lm_rows(read_jsonl(args.data), args.data, ByteTokenizer(), args.seq, truncate=False)
    assert all(r.tokens == args.seq for r in rows)
    dataset = [{"input_ids": torch.tensor(r.input_ids), "labels": torch.tensor(r.labels)} for r in rows]
    model = build_model(args.preset, device, args.dtype, seed=0)
    config = LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=list(LLAMA_TARGETS), lora_dropout=0.0)
    model = get_peft_model(model, config, autocast_adapter_dtype=False)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    ends: list[float] = []
    start = [0.0]

    class Timer(transformers.TrainerCallback):
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            start[0] = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ends.append(time.perf_counter() - start[0])

    with tempfile.TemporaryDirectory() as tmp:
        training = transformers.TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
            max_steps=args.steps, learning_rate=2e-4, weight_decay=0.0, lr_scheduler_type="cosine", warmup_steps=0,
            max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
            use_cpu=device.type == "cpu", seed=0, dataloader_drop_last=True, torch_compile=args.trainer_compile)
        trainer = transformers.Trainer(model=model, args=training, train_dataset=dataset, callbacks=[Timer()])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"side": "trainer", "status": "ok", "tokens_per_s": throughput(ends, args.batch * args.seq, args.warmup),
            "peak_bytes": peak, "memory_kind": "cuda max allocated" if device.type == "cuda" else "cpu peak RSS",
            "final_loss": losses[-1] if losses else None,
            "step_times_s": [round(b - a, 4) for a, b in zip([0.0] + ends, ends)]}


def run_trainer(args: argparse.Namespace, data: Path, argv: Sequence[str]) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", "trainer", "--data", str(data)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=args.timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return {"side": "trainer", "status": "failed", "error": proc.stderr[-2000:]}
    return json.loads(lines[-1])


# -- report ---------------------------------------------------------------------------------------------
def table(results: list[dict[str, Any]]) -> str:
    by = {r["side"]: r for r in results}
    ours, theirs = by.get("slimtune"), by.get("trainer")
    ok = ours is not None and theirs is not None and ours["status"] == theirs["status"] == "ok"
    rows = []
    for r in results:
        if r["status"] != "ok":
            rows.append([r["side"], r["status"], "", "", ""])
            continue
        rows.append([r["side"], f"{r['tokens_per_s']:,.0f}", f"{r['peak_bytes'] / GIB:.2f}",
                     "—" if r["final_loss"] is None else f"{r['final_loss']:.4f}", r["memory_kind"]])
    text = markdown_table(["side", "tokens/s", "peak GiB", "final loss", "memory"], rows)
    if ok:
        speed, peak = ours["tokens_per_s"] / theirs["tokens_per_s"], ours["peak_bytes"] / theirs["peak_bytes"]
        verdict = "met" if speed >= 1.2 and peak <= 0.8 else "not met"
        text += (f"\n\nslimtune ÷ Trainer+PEFT: tokens/s **{fmt_ratio(speed)}x**, peak **{fmt_ratio(peak)}x** "
                 f"(goal: >= 1.2x tokens/s at <= 0.8x peak: {verdict})")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child == "trainer":
        print(json.dumps(trainer_child(args)), flush=True)
        return 0
    print(environment_line(), file=sys.stderr)
    setting = (f"{args.preset}, LoRA r={args.rank}, seq {args.seq}, batch {args.batch}, {args.steps} steps "
               f"(throughput after {args.warmup}), {args.dtype} on {args.device}"
               f"{', gradient checkpointing' if args.grad_ckpt else ''}"
               f"{', slimtune --compile' if args.compile else ''}{', Trainer torch_compile' if args.trainer_compile else ''}")
    print(setting, file=sys.stderr)
    sink = JsonlSink("train_compare.jsonl")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = write_rows(work / "rows.jsonl", args.batch * args.steps, args.seq)
        for side in args.sides:
            result = run_slimtune(args, data, work) if side == "slimtune" else run_trainer(args, data, argv)
            result.update(preset=args.preset, seq=args.seq, batch=args.batch, steps=args.steps, rank=args.rank,
                          grad_ckpt=args.grad_ckpt, device=args.device,
                          compile=args.compile if side == "slimtune" else args.trainer_compile)
            sink.write(result)
            results.append(result)
            print(f"{side}: {result['status']}" + (f", {result['tokens_per_s']:,.0f} tokens/s, peak "
                                                   f"{result['peak_bytes'] / GIB:.2f} GiB" if result["status"] == "ok"
                                                   else f"\n{result.get('error', '')}"), file=sys.stderr, flush=True)
    text = f"{setting}\n\n{table(results)}\n"
    print(text)
    write_out_text("train_compare.md", f"# slimtune train vs Trainer + PEFT\n\n{environment_line()}\n\n{text}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
