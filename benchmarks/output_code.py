"""Inductor's output code for a compiled training step, and each graph's launches.

Builds a preset (``--layers``: that many decoder layers), adapts it with ``--method`` (``peft-bf16:METHOD``: PEFT's
with bf16 adapters; ``wideqkv:lora``: slimtune's with q/k/v stacked wide too, as ``paired_steps.py``'s), compiles
every decoder layer (``compile_layers``, or the same ``torch.compile`` of each layer on PEFT's model), runs
``--steps`` training steps and writes Inductor's output code (``TORCH_LOGS=output_code``) to ``--out``; then prints,
for each compiled graph, how many GEMMs (extern kernels) and generated kernels its ``call`` launches, and the
generated kernels' names in launch order. On CUDA the names are the Triton kernels a profile of
the step lists (``unet_step_profile.py``), so a profiled kernel can be read in the code that made it.

    python benchmarks/output_code.py --preset llama-3.2-3b --layers 1 --method dora --seq 2048 --out dora.txt
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

#: one graph's output code starts with this line (its AOT id: ``0_forward``, ``0_backward``, ...)
GRAPH_START = re.compile(r"# AOT ID: \['([^']+)'\]")


def launches(code: str) -> dict[str, list[str]]:
    """Each graph's launches in its ``call`` function, in order: ``extern:NAME`` for an extern kernel (a GEMM),
    else the generated kernel's name."""
    parts = GRAPH_START.split(code)
    graphs = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        call = body.split("def call(", 1)[-1].split("def benchmark_compiled_module", 1)[0]
        found = re.findall(r"extern_kernels\.(\w+)\(|\b((?:triton|cpp)_\w+?)(?:\.run)?\(", call)
        graphs[name] = [f"extern:{ext}" if ext else kernel for ext, kernel in found]
    return graphs


def summary(graphs: dict[str, list[str]]) -> str:
    lines = []
    for name, kernels in graphs.items():
        externs = sum(k.startswith("extern:") for k in kernels)
        lines.append(f"{name}: {externs} extern, {len(kernels) - externs} generated")
        lines.extend(f"    {k}" for k in kernels)
    return "\n".join(lines)


def run_step(args: argparse.Namespace) -> None:
    """The child: build, adapt, compile, step (its output code logged by torch)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from paired_steps import compiled_stacks, register_layers_preset, widen_triples

    from slimtune.models.layers import compile_layers
    from slimtune.models.presets import build_model
    from slimtune.models.workload import default_targets, make_adapter_config, make_inputs, training_loss

    preset = register_layers_preset(args.preset, args.layers, before=False) if args.layers else args.preset
    device = args.device
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = build_model(preset, device, dtype).train()
    method = args.method.split(":")[-1]
    targets = default_targets(preset, method)
    if args.method.startswith("peft-bf16:"):
        import peft
        config = peft.LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=targets,
                                 use_dora=method == "dora")
        model = peft.get_peft_model(model, config, autocast_adapter_dtype=False)
    else:
        import slimtune
        slimtune.adapt(model, make_adapter_config(method, args.rank, None, targets))
    compile_layers(model)  # regional, PEFT's model too
    if args.method.startswith("wideqkv:"):
        for stacks in compiled_stacks(model):
            widen_triples(stacks)
    inputs = make_inputs(preset, model, args.batch, args.seq, device, dtype)
    for _ in range(args.steps):
        training_loss(preset, model, inputs).backward()
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-llama")
    parser.add_argument("--layers", type=int, default=1, help="decoder layers (0: the preset's own)")
    parser.add_argument("--method", default="dora", help="lora, dora, peft-bf16:lora, peft-bf16:dora or wideqkv:lora")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--out", default="output_code.txt")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_step(args)
        return
    env = dict(os.environ, TORCH_LOGS="output_code", TORCH_LOGS_OUT=str(Path(args.out).resolve()))
    # torch logs to stderr as well as to the file: the child's stderr is kept only where it fails
    child = subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]], env=env, stderr=subprocess.PIPE,
                           text=True)
    if child.returncode:
        raise SystemExit(child.stderr[-4000:])
    print(summary(launches(Path(args.out).read_text())))


if __name__ == "__main__":
    main()
