"""The adapter methods, one package each: config, math (plain functions and references), autograd Functions,
Triton kernels beside their references, the module, and the PEFT-format mapping.

Importing this package registers every method with :mod:`slimtune.core.registry`. Methods import
:mod:`slimtune.core` and nothing of each other — except DoRA, which is LoRA with a magnitude and builds on it.
"""
from . import dora, hra, loha, lokr, lora  # noqa: F401  (registration)
