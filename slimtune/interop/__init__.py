"""Other ecosystems' checkpoint formats: kohya / LyCORIS ``.safetensors`` files for diffusion models, both ways.

:func:`save_kohya` / :func:`load_kohya` write and read LoRA/LoCon, DoRA (``dora_scale``), LoHa and LoKr adapters of
a diffusers UNet or DiT as kohya's trainers and LyCORIS do (:mod:`.files`); :func:`convert` turns such a file into a
PEFT adapter directory and back without a model (``slimtune convert``), bit for bit; :func:`targets` gives the
``"attn"`` / ``"attn+conv"`` / ``"all"`` target presets LyCORIS users know (:mod:`.presets`). Module names:
:mod:`.names`; which tensor is which: :mod:`.layout`; the PEFT config a file amounts to: :mod:`.infer`; the
in-memory conversion: :mod:`.kohya`.
"""
from .files import FORMATS, convert, load_kohya, read_peft, read_safetensors, save_kohya, write_kohya, write_peft
from .kohya import RECORD_KEY, PeftAdapter, kohya_to_peft, peft_to_kohya
from .names import DEFAULT_PREFIX, DENOISER_PREFIXES, TEXT_ENCODER_PREFIXES, decode_path, kohya_name
from .presets import TARGET_PRESETS, architecture, targets

__all__ = ["DEFAULT_PREFIX", "DENOISER_PREFIXES", "FORMATS", "PeftAdapter", "RECORD_KEY", "TARGET_PRESETS",
           "TEXT_ENCODER_PREFIXES", "architecture", "convert", "decode_path", "kohya_name", "kohya_to_peft",
           "load_kohya", "peft_to_kohya", "read_peft", "read_safetensors", "save_kohya", "targets", "write_kohya",
           "write_peft"]
