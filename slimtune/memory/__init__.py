"""Measuring what training costs: parameters, memory after model creation and after a step, peak memory
broken down by part (and activations by module kind), step time; plots and sweeps of configurations; and
predicting it from the configuration alone (:mod:`.estimate`, :mod:`.plan`).
"""
from .accounting import ACTIVATION_KINDS, SavedTensorMeter
from .chunked_loss import chunked_causal_lm_loss
from .options import BACKENDS, METHODS, QUANTS, ProfileOptions
from .plot import plot_results
from .profile import TrainingSession, profile_options, profile_training
from .recompute import checkpoint_layers
from .result import BREAKDOWN_KEYS, CPU_MEMORY, CUDA_MEMORY, ProfileResult, median_step_time
from .setting import MEMORY_SETTINGS, apply_memory_setting, memory_setting
from .subproc import run_children
from .sweep import SweepSpec, run_sweep, sweep_configs

__all__ = ["ACTIVATION_KINDS", "BACKENDS", "BREAKDOWN_KEYS", "CPU_MEMORY", "CUDA_MEMORY", "MEMORY_SETTINGS", "METHODS",
           "ProfileOptions", "ProfileResult", "QUANTS", "SavedTensorMeter", "SweepSpec", "TrainingSession",
           "apply_memory_setting", "checkpoint_layers", "chunked_causal_lm_loss", "median_step_time", "memory_setting",
           "plot_results", "profile_options", "profile_training", "run_children", "run_sweep", "sweep_configs"]
