"""First training losses of a small random Llama with LoRA, eager against ``compile_layers`` (Inductor), in one
dtype — on the CPU, to see whether a compiled step's numbers move from the eager ones, and which way against
float32. ``--before DIR`` runs the earlier copy of the package in DIR (``slimtune_before``) instead::

    python benchmarks/compiled_trajectory.py --dtype bfloat16 [--compiled] [--before .before]
"""
from __future__ import annotations

import argparse
import importlib
import sys

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--compiled", action="store_true")
    parser.add_argument("--before", default=None, metavar="DIR")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    import transformers

    package = "slimtune"
    if args.before:
        sys.path.insert(0, args.before)
        package = "slimtune_before"
    slimtune = importlib.import_module(package)
    layers = importlib.import_module(f"{package}.models.layers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    model = transformers.LlamaForCausalLM(config).to(getattr(torch, args.dtype)).train()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = slimtune.adapt(model, slimtune.LoraConfig(r=32, lora_alpha=32, target_modules=targets))
    if args.compiled:
        layers.compile_layers(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, 512, (4, 128), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(args.steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(round(loss.item(), 5))
    print(f"{package} {args.dtype} {'compiled' if args.compiled else 'eager'}: {losses}")


if __name__ == "__main__":
    main()
