"""``slimtune train``: fine-tune an adapter from a JSONL file to a PEFT-format checkpoint, on one GPU or many.

:func:`train` runs a :class:`TrainConfig`; the pieces: :mod:`.config` (settings and their checks), :mod:`.data`
(JSONL records, tokenizers, packing), :mod:`.tasks` (causal-lm, classification, diffusion objectives),
:mod:`.loss` (the causal-LM loss without full logits), :mod:`.build` (model, quantisation, adapter),
:mod:`.order` (data order), :mod:`.loop` (the loop), :mod:`.checkpoint` (atomic, resumable checkpoints),
:mod:`.rundir` (the output directory), :mod:`.distributed` (torchrun: DDP and FSDP2), :mod:`.progress`
(progress bar, summary, JSON lines).
"""
from .config import TASKS, TrainConfig
from .progress import JsonReporter, Reporter, RichReporter, make_reporter
from .run import train

__all__ = ["JsonReporter", "Reporter", "RichReporter", "TASKS", "TrainConfig", "make_reporter", "train"]
