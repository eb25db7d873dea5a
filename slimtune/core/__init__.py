"""The machinery every adapter method shares, written once.

* :mod:`.config` — the fields every method's config has (targets, rank/alpha patterns) and their checks;
* :mod:`.targeting` — which modules a config selects; :mod:`.inject` — putting adapters in and taking them out;
* :mod:`.module` — :class:`~slimtune.core.module.AdapterModule`, the protocol every adapter layer follows
  (frozen ``base_layer``, merge/unmerge, PEFT tensor I/O);
* :mod:`.registry` — method name -> config class, module builder, PEFT format (filled by :mod:`slimtune.methods`);
* :mod:`.peft_format` / :mod:`.checkpoint` — PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``;
* :mod:`.frozen` — the frozen weight as kernels see it (a dense tensor, or a handle to 4-bit storage);
* :mod:`.lowrank` — the one low-rank product ``x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ`` (autograd Function, backward-order
  chooser, dropout by seed) that LoRA, DoRA, HRA and LoHa all use;
* :mod:`.structured`, :mod:`.products`, :mod:`.costs`, :mod:`.structured_adapter` — the structured / folded
  training paths LoHa and LoKr share;
* :mod:`.compute`, :mod:`.autograd_state`, :mod:`.triton`, :mod:`.simulation` — small shared helpers.

Nothing here imports a method; methods import from here (``tests/test_layout.py`` enforces the directions).
"""
