#!/usr/bin/env bash
# The GPU measurements that sessions without a device left open, in parts that each fit one device call
# (≤ 10 min) and together the 30-minute device budget; run on 2026-12-05 as RESULTS.md runs 47 (part 1), 48 (part 3)
# and 49 (part 2), and kept to repeat them. Run from the repository root on the lent machine:
#
# Still to run (as of 2026-12-07, twenty-third session, which got no device time): part 97 (any GPU, about 6
# minutes; part 98 is its paired rounds alone, about 4), which times compiled rows' forward products from a Triton
# kernel (a triton_op in the graph, tritonproduct:lora) against cuBLAS's, and q/k/v stacked wide (wideqkv:lora), in
# the step at seq 2048 beside LoRA and PEFT-bf16; then part 95's profile of where each step's GPU idles; on an H200,
# parts 94 (or 82) and 89. Twenty-second session: part 93 ran as RESULTS.md run 183 (the one device call that
# started: 13 tries).
# Twenty-first session: part 92 ran as RESULTS.md run 180, part 91's profile
# as run 181 (its paired rounds not run: run 182 ran unstacked configurations instead).
# Twentieth session: parts 88 and 89 (issue 19's bounds on the code as it is, any card) ran twice each on one H100 as
# RESULTS.md runs 175-178, part 90 (compiled seq 2048 for LoRA, LoHa, LoKr) as run 179.
# Nineteenth session's list: on an H200, part 82 (compiled LoRA and DoRA against PEFT-bf16;
# part 80 adds a profile). Part 86 ran in shortened form as RESULTS.md run 172 (with PEFT-bf16 beside it); a part 87
# (a Triton kernel for a DoRA chain's norm parts, RESULTS.md runs 170-171) ran and was removed with the kernel.
# Eighteenth session's list: parts 84 and 85 ran in shortened form as RESULTS.md runs 167-168.
# Sixteenth session's list (parts 78 and 77 ran as RESULTS.md runs 151-152 on an H100; compiled
# DoRA on stacked rows is 0.84-0.88x PEFT-bf16 compiled there): part 79 on an H200 (compiled LoRA and DoRA, eager HRA).
# Fifteenth session's list (as of 2026-12-07; part 75 ran as RESULTS.md run 146, part 76 as run 147, on an
# H100): compiled DoRA now trains (torch 2.11's zero gradients, fixed in slimtune.core.tracing) but is 1.08-1.16x
# PEFT-bf16 compiled (runs 147, 149) — profile its compiled step's kernels per layer against PEFT's next
# (unet_step_profile.py --compile --top 60 --configs dora peft-bf16:dora); on an H200, part 58 (or 56) for issue
# 20's LoKr step, parts 63 and 64 for issue 19's compiled LoRA and DoRA and the floor under LoRA's step.
# Fourteenth session's list: parts 74 and 72 ran as RESULTS.md run 145 on an H200; part 70 as runs 140-141 (H100);
# part 71 (a Triton sum kernel; removed with the kernel) as run 143.
# Earlier list (as of 2026-12-06, third session: parts 44-45 ran as RESULTS.md run 105, 46 as 106, 43 as 107, 48
# (with 47) as 108):
# - part 49 (any GPU, about 2 minutes): compiled DoRA's step profiled against compiled PEFT-bf16's, where run 108
#   has it at 1.19x with every layer compiled on both sides;
# - part 50 on an H200 (about 5 minutes): LoHa and LoKr compiled on both sides, every layer in the graph;
# - part 51 on an H200 (needs_h200, carry .whl; about 5 minutes): SD-1.5 every method with both sides captured;
# - part 46 again on an H200 once LoKr's eager SD-1.5 step changes (run 106: 1.05-1.07x PEFT-bf16, the one method
#   over issue 20's step bound there).
#
#   bash benchmarks/pending_gpu.sh 1    # issue 19: capture test, DoRA host breakdown, paired steps eager / captured /
#                                       #           timed variants, slimtune vs PEFT-bf16 (no carry)
#   bash benchmarks/pending_gpu.sh 2    # issue 20: SD-1.5 UNet vs PEFT-bf16, memory fast and balanced (carry .whl)
#   bash benchmarks/pending_gpu.sh 4    # issue 20: the same for LoCon / LoHa / LoKr (carry .whl; not yet run)
#   bash benchmarks/pending_gpu.sh 5    # flux-dit-4b balanced (single blocks' MLP recompute) and the planner's
#                                       #           "balanced +15" row for the 3B shape: predicted 21.26 GiB (carry .whl)
#   bash benchmarks/pending_gpu.sh 6    # issues 19/20: DoRA as one Function with one Triton launch each way — the
#                                       #           CUDA test, host cost, paired steps against the previous code
#                                       #           (carry .before: `git archive REF slimtune`, renamed slimtune_before)
#                                       #           and PEFT-bf16, SD-1.5 DoRA against PEFT-bf16 (carry .whl)
#   bash benchmarks/pending_gpu.sh 7    # issues 19/20: 3B DoRA against the previous code once more (carry .before),
#                                       #           SD-1.5 step ratios from paired rounds (every model in one
#                                       #           process, PEFT-bf16's too), memory fast and balanced (carry .whl)
#   bash benchmarks/pending_gpu.sh 8    # issue 20: where slimtune LoRA's SD-1.5 `fast` step exceeds PEFT's (run 54:
#                                       #           1.08x) — paired rounds without each kind of lean frozen layer
#                                       #           (stripped:lora), the full set and PEFT-bf16 (carry .whl)
#   bash benchmarks/pending_gpu.sh 9    # issue 19: q/k/v and gate/up LoRA as one Function (core.siblings) — CUDA
#                                       #           tests, paired rounds fused / alone:lora / PEFT-bf16 at 3B seq
#                                       #           512 and 2048 and on SD-1.5 (carry .whl for SD-1.5)
#   bash benchmarks/pending_gpu.sh 10   # issue 19: seq 2048, every method against PEFT-bf16 in paired rounds
#   bash benchmarks/pending_gpu.sh 11   # issue 19: the 8192 r=384 layer against its GEMM floor (layer_compare.py)
#   bash benchmarks/pending_gpu.sh 12   # issue 19: the lean RMSNorm and SwiGLU (one Triton kernel each way) — CUDA
#                                       #           tests, paired rounds with and without them (stripped:METHOD) and PEFT-bf16
#                                       #           at 3B seq 512, then LoRA / DoRA at seq 2048
#   bash benchmarks/pending_gpu.sh 13   # issue 19: torch.compile on both sides at seq 512 (LoRA, DoRA), the 8192
#                                       #           layer against its GEMM floor
#   bash benchmarks/pending_gpu.sh 14   # issues 19/20 on the H200 issue 19 names: lean-layer and recipe CUDA tests,
#                                       #           seq 512 every method against PEFT-bf16 and LoRA against the code
#                                       #           before the recipes (core.rebuild), each lean layer's cost alone
#                                       #           (lean_layer_cost.py) (carry .whl, .before)
#   bash benchmarks/pending_gpu.sh 15   # issue 20: SD-1.5 LoRA against the code before the recipes, every method
#                                       #           against PEFT-bf16; host cost of the norm / SwiGLU forms (carry
#                                       #           .whl, .before)
#   bash benchmarks/pending_gpu.sh 16   # issue 19: seq 2048 LoHa / LoKr / HRA against PEFT-bf16
#   bash benchmarks/pending_gpu.sh 17   # issue 19: the lean RMSNorm as PyTorch's fused F.rms_norm on CUDA — CUDA
#                                       #           tests, LoRA / DoRA at seq 512 against the session's first commit
#                                       #           and PEFT-bf16 (carry .before)
#   bash benchmarks/pending_gpu.sh 18   # issues 19/20: run 66 (its hook-based UNet layers are reverted; it now
#                                       #           measures the code as it is) — CUDA tests, lean_layer_cost.py,
#                                       #           SD-1.5 and 3B seq 512 against the session's first commit and
#                                       #           PEFT-bf16 (carry .whl, .before)
#   bash benchmarks/pending_gpu.sh 19   # issues 19/20: the session's final code (fused norm; MLP recipe from 64 MiB;
#                                       #           Function-based UNet lean layers with recipes) against 15d056d
#                                       #           and PEFT-bf16, 3B seq 512 and SD-1.5 (carry .whl, .before)
#   bash benchmarks/pending_gpu.sh 20   # issue 19: DoRA's step vectors in one launch per forward (methods.dora.prepass)
#                                       #           — CUDA tests, host cost, 3B seq 512 against ca4e9e6 and
#                                       #           PEFT-bf16 (carry .whl, .before)
#   bash benchmarks/pending_gpu.sh 21   # issues 19/20: the pre-pass's tests, 3B seq 512 every method, SD-1.5 DoRA
#                                       #           against ca4e9e6 and PEFT-bf16 (carry .whl, .before)
#   bash benchmarks/pending_gpu.sh 22   # issue 19: torch.compile on both sides at seq 512, DoRA and LoRA
#   bash benchmarks/pending_gpu.sh 23   # issue 19: the pre-pass by input width — tests, 3B seq 512 DoRA / LoRA / LoKr
#                                       #           against ca4e9e6 and PEFT-bf16 (carry .before)
#   bash benchmarks/pending_gpu.sh 24   # issue 19: Triton 3.6's interpreter on the existing kernels; DoRA / LoKr at
#                                       #           seq 512 in 20 rounds against ca4e9e6 and PEFT-bf16 (carry .before)
#   bash benchmarks/pending_gpu.sh 25   # issues 19/20: the pre-pass on the "z" route too — DoRA CUDA tests, SD-1.5
#                                       #           and 3B DoRA against ca4e9e6 and PEFT-bf16 (carry .whl, .before)
#   bash benchmarks/pending_gpu.sh 26   # issues 19/20: the pre-pass for DoRA convolutions — CUDA tests, SD-1.5 DoRA
#                                       #           against ca4e9e6 and PEFT-bf16 (carry .whl, .before)
#   bash benchmarks/pending_gpu.sh 27   # issue 19: torch.compile on both sides at seq 512, LoHa and LoKr
#   bash benchmarks/pending_gpu.sh 28   # issue 19 on an H200: seq 512 every method (20 rounds), DoRA at seq 2048
#                                       #           with and without the pre-pass and against ca4e9e6 (carry .before)
#   bash benchmarks/pending_gpu.sh 29   # issues 19/20: a UNet's lean layers from UNET_LEAN_BYTES, recipes entered by
#                                       #           their consumers; the pre-pass kernel's vector loads — CUDA tests,
#                                       #           the kernel's GPU time, DoRA at seq 2048, SD-1.5 every method
#                                       #           against 329223c and PEFT-bf16 (carry .whl, .before)
#   bash benchmarks/pending_gpu.sh 30   # issue 19 on the H200: torch.compile for DoRA and LoRA, the 8192 r=384 layer
#   bash benchmarks/pending_gpu.sh 31   # issue 20: where SD-1.5's step goes (unet_step_profile.py), LoRA and LoKr
#                                       #           against PEFT-bf16 (carry .whl)
#   bash benchmarks/pending_gpu.sh 32   # issue 19 on an H200: DoRA at seq 2048 with / without the pre-pass, PEFT-bf16
#   bash benchmarks/pending_gpu.sh 33   # issue 20: the lean convolution's transposed backward — CUDA tests, SD-1.5
#                                       #           LoRA fused / alone against 6debeda and PEFT-bf16, LoCon, LoHa,
#                                       #           LoKr, DoRA against PEFT-bf16 (carry .whl, .before)
#   bash benchmarks/pending_gpu.sh 34   # issue 20: part 33 in 20-30 rounds, recipes rebuilt once per backward
#                                       #           (carry .whl, .before)
#   bash benchmarks/pending_gpu.sh 35   # issue 20: the lean convolution's backward against autograd's (CUDA test),
#                                       #           and whether autograd's own repeats (cudnn_repeat.py)
#   bash benchmarks/pending_gpu.sh 36   # issue 20: SD-1.5 LoKr chosen / folded / structured paths against PEFT-bf16
#                                       #           (carry .whl)
#   bash benchmarks/pending_gpu.sh 37   # issue 20: SD-1.5 LoKr / LoHa with the cheaper path query, LoKr's paths
#                                       #           forced, LoRA, against PEFT-bf16 (carry .whl)
#   bash benchmarks/pending_gpu.sh 38   # issue 20: frozen ResNet blocks as one Function, Attention called directly —
#                                       #           CUDA tests, SD-1.5 every method against 6debeda and PEFT-bf16
#                                       #           (carry .whl, .before)
#   bash benchmarks/pending_gpu.sh 39   # issue 20: part 38 for a short lease — CUDA tests, SD-1.5 LoRA / LoKr
#                                       #           against 6debeda and PEFT-bf16 (carry .whl, .before)
#   bash benchmarks/pending_gpu.sh 40   # issue 20: recipes kept by the Functions themselves, the attention body
#                                       #           without its no-op steps, LoCon's ResNet blocks as one Function —
#                                       #           CUDA tests, SD-1.5 LoRA / LoCon / LoKr against 8def1c5 and
#                                       #           PEFT-bf16, QLoRA against PEFT-bf16 (carry .whl, .before = 8def1c5)
#   bash benchmarks/pending_gpu.sh 41   # issue 20: LoKr's convolution backward through w2's adjoint (two
#                                       #           convolution backward calls where three ran) — CUDA tests, SD-1.5
#                                       #           LoRA / LoCon (unchanged: controls) / LoKr against 5853aec and
#                                       #           PEFT-bf16, and where LoKr's host time goes against PEFT's (CUDA
#                                       #           runtime calls, ATen ops, garbage collections), block_compare.py;
#                                       #           on an H200 compiled DoRA and the 8192 layer first (issue 19)
#                                       #           (carry .whl, .before = 5853aec). To measure LoCon's 1x1 up
#                                       #           convolution as a GEMM (tried, reverted unmeasured on a GPU), first
#                                       #           `git cherry-pick -n 0a2cb68` (RESULTS.md, run 100)
#   bash benchmarks/pending_gpu.sh 42   # issue 20: part 41 for a short lease — CUDA tests, SD-1.5 LoCon / LoKr
#                                       #           against 5853aec and PEFT-bf16 (carry .whl, .before = 5853aec)
#                                       #           (41 and 42 ran as RESULTS.md runs 102 and 103, on an H100)
#   bash benchmarks/pending_gpu.sh 43   # issue 19 on an H200 (needs_h200): compiled DoRA against PEFT-bf16, the
#                                       #           8192 r=384 layer, DoRA at seq 2048 (part 32)
#   bash benchmarks/pending_gpu.sh 44   # issue 20: LoKr with the UNet lean layers from 16 MiB against 4 MiB (the
#                                       #           earlier copy's threshold alone: --before-unet-lean-bytes; carry
#                                       #           .whl, .before = HEAD), SD-1.5 with no lean layer, the ResNet
#                                       #           blocks with and without them (block_compare.py --lean-off --profile)
#   bash benchmarks/pending_gpu.sh 45   # issue 20: SD-1.5 captured as a CUDA graph on both sides (carry .whl)
#   bash benchmarks/pending_gpu.sh 46   # issue 20 on the H200 it names (needs_h200): SD-1.5 every method against
#                                       #           PEFT-bf16, LoKr's lean layers from 16 MiB against 4 MiB (carry
#                                       #           .whl, .before = 90e6890), then SD-1.5 captured as CUDA graphs
#                                       #           with each capture's peak
#   bash benchmarks/pending_gpu.sh 47   # issue 19: `slimtune train --capture` — its CUDA tests, SD-1.5 LoRA / LoKr
#                                       #           trained 40 steps eager and captured (carry .whl)
#   bash benchmarks/pending_gpu.sh 48   # issue 19 on an H200: LoRA / DoRA compiled on both sides with every layer
#                                       #           in the graph (no per-layer recompiles), then part 47 (carry .whl)
#   bash benchmarks/pending_gpu.sh 49   # issue 19: compiled DoRA's step profiled against compiled PEFT-bf16's
#   bash benchmarks/pending_gpu.sh 50   # issue 19 on an H200: LoHa / LoKr compiled on both sides, every layer
#   bash benchmarks/pending_gpu.sh 51   # issue 20 on an H200: SD-1.5 every method, both sides captured (carry .whl)
#   bash benchmarks/pending_gpu.sh 54   # issue 20 on an H200: LoKr's convolution backward in one call, against
#                                       #           the code before it and PEFT-bf16 (carry .whl, .before)
#   bash benchmarks/pending_gpu.sh 55   # issue 20: the same with many rounds, and LoKr without lean layers, paired
#                                       #           (carry .whl, .before, .before_new)
#   bash benchmarks/pending_gpu.sh 56   # issue 20 on an H200: LoKr eager against the code before and PEFT-bf16, then
#                                       #           LoHa / DoRA with both sides captured (carry .whl, .before)
#   bash benchmarks/pending_gpu.sh 57   # issue 19: `slimtune train --capture` on an NF4 base with evaluation, and on
#                                       #           DiT / SD presets, against the same runs eager (carry .whl)
#   bash benchmarks/pending_gpu.sh 58   # part 56 in about 5 minutes (fewer rounds), for a short device budget
#   bash benchmarks/pending_gpu.sh 59   # issue 19: compiled LoRA with q/k/v and gate/up as one Function, against
#                                       #           each layer alone and PEFT-bf16 compiled, paired; then profiled
#   bash benchmarks/pending_gpu.sh 60   # issue 19: LoRA's sums under compile as views (no addmm copies) against the
#                                       #           code before and PEFT-bf16 compiled (carry .before = e368713)
#   bash benchmarks/pending_gpu.sh 61   # issue 19: the same for DoRA's sums (carry .before = 60d2260)
#   bash benchmarks/pending_gpu.sh 64   # issue 19: the floor under LoRA's step (adapters out, backward through every
#                                       #           layer) and LoRA with slimtune train's loss, compiled and eager,
#                                       #           beside LoRA / DoRA and PEFT-bf16
#   bash benchmarks/pending_gpu.sh 65   # slimtune train's chunked loss with its Triton kernel: CUDA tests, against
#                                       #           transformers' loss and the reference chunk (loss_compare.py)
#   bash benchmarks/pending_gpu.sh 66   # slimtune train's loss (no host synchronisation) in the 3B LoRA step, compiled
#                                       #           and eager, against the protocol's loss and PEFT-bf16
#   bash benchmarks/pending_gpu.sh 3    # issue 17: online / gradient / data allocation vs AdaLoRA wall time
#                                       #           (carry .out/minilm_wide; make it with rank_allocation.py --prepare)
#
# Outputs go to $OUT (each script's own files, plus one log per step); record them in benchmarks/RESULTS.md with
# the GPU and versions the scripts print.
set -uo pipefail
part=${1:?"usage: bash benchmarks/pending_gpu.sh 1|2|...|96"}
out=${OUT:-/tmp/pending_gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

step() {  # step NAME SECONDS COMMAND...: run one command under a time limit, its output logged (a failure goes on)
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "   exit $? after ${SECONDS}s in all; last lines:"
    tail -n 25 "$out/$name.log"
}

compiled_rounds_16() {  # issue 19's compiled bound: LoRA and DoRA against PEFT-bf16 compiled, 16 rounds in turns of 3
    for m in lora dora; do
        step "paired_512_compile_16_$m" 170 python benchmarks/paired_steps.py --compile --rounds 16 \
            --steps-per-turn 3 --configs $m peft-bf16:$m --out-name "paired_512_compile_16_$m"
    done
}

install_wheels() {  # diffusers and bitsandbytes, where .whl was carried
    if ls .whl/*.whl > /dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/diffusers-*.whl .whl/bitsandbytes-*.whl
        export PYTHONPATH=$PYTHONPATH:/tmp/site
    fi
}

case $part in
1)
    step capture_test 100 python -m pytest -q tests/core/test_capture.py
    step dora_host_breakdown 80 python benchmarks/host_cost.py --only dora breakdown
    for mode in "" --capture --timed; do
        step "paired_steps${mode:-_eager}" 130 python benchmarks/paired_steps.py \
            --configs lora dora peft-bf16:lora peft-bf16:dora --rounds 10 ${mode:+$mode} \
            --out-name "paired_steps${mode:-_eager}"
    done
    ;;
2)
    install_wheels
    # run 49 reached HRA in 280 s per mode: the attention methods here, the convolution ones in part 4
    for memory in fast balanced; do  # each into its own folder (the script's file names are fixed)
        step "diffusion_$memory" 280 env OUT="$out/diffusion_$memory" python benchmarks/diffusion_compare.py \
            --skip-dit --steps 8 --memory "$memory" --methods none lora qlora dora hra
    done
    ;;
4)
    install_wheels
    for memory in fast balanced; do
        step "diffusion_conv_$memory" 280 env OUT="$out/diffusion_conv_$memory" python benchmarks/diffusion_compare.py \
            --skip-dit --steps 8 --memory "$memory" --methods locon loha lokr
    done
    ;;
3)
    step rank_allocation 560 python benchmarks/rank_allocation.py --model-dir .out/minilm_wide --device cuda \
        --seeds 0 1 2 3 --epochs 8 --probe-epochs 1 \
        --variants slimtune-online slimtune-gradient slimtune-data adalora
    ;;
5)
    # flux-dit-4b at 1024 px, batch 1: balanced now recomputes the single blocks' proj_mlp + GELU (predicted LoRA r=16
    # 16.19 -> 14.61 GiB, HRA r=32 16.53 -> 15.02); and the planner's "balanced +N" row for the 3B shape on 24 GB
    install_wheels
    for memory in fast balanced; do
        step "dit_lora_$memory" 140 python -m slimtune profile --preset flux-dit-4b --method lora --rank 16 \
            --batch 1 --steps 4 --memory "$memory" --json
        step "dit_hra_$memory" 140 python -m slimtune profile --preset flux-dit-4b --method hra --rank 32 \
            --batch 1 --steps 4 --memory "$memory" --json
    done
    step plan_plain_layers 60 python -m slimtune profile --preset llama-3.2-3b --method lora --rank 16 --batch 4 \
        --seq 2048 --steps 4 --memory balanced --plain-layers 15 --json
    ;;
6)
    install_wheels
    step dora_cuda_test 150 python -m pytest -q tests/methods/dora/test_cuda.py
    step dora_host_cost 90 python benchmarks/host_cost.py --only dora
    step paired_steps_dora 200 python benchmarks/paired_steps.py --before .before \
        --configs lora dora before:dora peft-bf16:dora peft-bf16:lora --rounds 8 --out-name paired_steps_dora
    step diffusion_dora_fast 120 env OUT="$out/diffusion_dora_fast" python benchmarks/diffusion_compare.py \
        --skip-dit --steps 8 --memory fast --methods dora
    ;;
7)
    install_wheels
    step dora_cuda_test 60 python -m pytest -q tests/methods/dora/test_cuda.py
    step paired_steps_dora_trimmed 100 python benchmarks/paired_steps.py --before .before \
        --configs dora before:dora peft-bf16:dora --rounds 6 --out-name paired_steps_dora_trimmed
    for memory in fast balanced; do
        step "paired_steps_sd15_$memory" 200 python benchmarks/paired_steps.py --preset stable-diffusion-1.5 \
            --rank 16 --memory "$memory" --rounds 6 --out-name "paired_steps_sd15_$memory" \
            --configs lora dora locon loha lokr peft-bf16:lora peft-bf16:dora peft-bf16:locon peft-bf16:loha \
            peft-bf16:lokr
    done
    ;;
8)
    install_wheels
    for kinds in norm-silu conv geglu; do
        step "paired_sd15_strip_$kinds" 170 python benchmarks/paired_steps.py --preset stable-diffusion-1.5 \
            --rank 16 --configs lora stripped:lora peft-bf16:lora --strip-lean "$kinds" --rounds 10 \
            --out-name "paired_sd15_strip_$kinds"
    done
    ;;
9)
    # issue 19: LoRA and DoRA siblings (q/k/v, gate/up) as one Function — the CUDA tests (DoRA's group through its
    # Triton kernels; the scale-in-epilogue GEMM), then paired rounds of the fused step against the same model with
    # every layer alone and PEFT-bf16, 3B seq 512 (LoRA and DoRA) and 2048, and SD-1.5 (attn1's q/k/v, attn2's k/v;
    # carry .whl)
    install_wheels
    step siblings_cuda_test 150 python -m pytest -q tests/core/test_lowrank_group.py tests/core/test_siblings.py \
        tests/core/test_compute.py tests/methods/dora/test_group.py tests/methods/dora/test_cuda.py
    step paired_siblings_512 150 python benchmarks/paired_steps.py --configs lora alone:lora peft-bf16:lora \
        --rounds 12 --out-name paired_siblings_512
    step paired_siblings_dora_512 170 python benchmarks/paired_steps.py --configs dora alone:dora \
        peft-bf16:dora --rounds 8 --out-name paired_siblings_dora_512
    step paired_siblings_2048 150 python benchmarks/paired_steps.py --configs lora alone:lora peft-bf16:lora \
        --seq 2048 --rounds 6 --out-name paired_siblings_2048
    step paired_siblings_sd15 150 python benchmarks/paired_steps.py --preset stable-diffusion-1.5 --rank 16 \
        --configs lora alone:lora peft-bf16:lora --rounds 8 --out-name paired_siblings_sd15
    ;;
10)
    # issue 19 at seq 2048 (the GPU-bound end): every method against PEFT-bf16 in paired rounds, two groups so that
    # each process's models fit a 141 GB H200 (PEFT's HRA is out of memory at this shape from seq 512: shared baseline;
    # on an 80 GB H100 four models ran out of memory, run 62: there run one method per process, as part 12 does)
    step paired_2048_lora_dora 280 python benchmarks/paired_steps.py --seq 2048 --rounds 5 \
        --configs lora dora peft-bf16:lora peft-bf16:dora --out-name paired_2048_lora_dora
    step paired_2048_structured 280 python benchmarks/paired_steps.py --seq 2048 --rounds 5 \
        --configs loha lokr hra peft-bf16:loha peft-bf16:lokr --out-name paired_2048_structured
    ;;
11)
    # issue 19: the 8192x8192 r=384 layer (4096 tokens) against its GEMM floor (each GEMM of LoRA's fwd+bwd timed
    # alone, summed; the criterion is <= 1.25x), and slimtune against PEFT at the protocol's layer shapes
    step layer_compare 240 python benchmarks/layer_compare.py
    ;;
12)
    step lean_llama_cuda_test 120 python -m pytest -q tests/core/test_lean_llama_cuda.py tests/core/test_rms_norm.py \
        tests/core/test_swiglu.py
    step paired_lean_llama_512 230 python benchmarks/paired_steps.py --configs lora stripped:lora peft-bf16:lora dora \
        stripped:dora peft-bf16:dora --strip-lean rmsnorm mlp --rounds 6 --out-name paired_lean_llama_512
    # one process per method: four 3B models at seq 2048 ran out of an H100's 80 GB in PEFT's float32 logits (run 62)
    for method in lora dora; do
        step "paired_2048_$method" 130 python benchmarks/paired_steps.py --seq 2048 --rounds 4 \
            --configs "$method" "peft-bf16:$method" --out-name "paired_2048_$method"
    done
    ;;
13)
    step paired_compile_512 300 python benchmarks/paired_steps.py --compile --configs lora peft-bf16:lora dora \
        peft-bf16:dora --rounds 6 --out-name paired_compile_512
    step layer_compare 240 python benchmarks/layer_compare.py
    ;;
14)
    # carry .whl and .before (`git archive REF slimtune`, renamed slimtune_before: the code before the recipes)
    install_wheels
    step lean_cuda_test 100 python -m pytest -q tests/core/test_lean_llama_cuda.py tests/core/test_rebuild.py \
        tests/core/test_swiglu.py tests/core/test_lean_layers.py
    step paired_512_every 320 python benchmarks/paired_steps.py --rounds 8 --before .before --configs lora dora loha \
        lokr before:lora peft-bf16:lora peft-bf16:dora peft-bf16:loha peft-bf16:lokr --out-name paired_512_every
    step lean_layer_cost 100 python benchmarks/lean_layer_cost.py
    ;;
15)
    install_wheels
    step paired_sd15_recipes 150 python benchmarks/paired_steps.py --preset stable-diffusion-1.5 --rank 16 \
        --rounds 8 --before .before --configs lora before:lora peft-bf16:lora --out-name paired_sd15_recipes
    step paired_sd15_every 260 python benchmarks/paired_steps.py --preset stable-diffusion-1.5 --rank 16 --rounds 6 \
        --configs lora dora locon loha lokr peft-bf16:lora peft-bf16:dora peft-bf16:locon peft-bf16:loha \
        peft-bf16:lokr --out-name paired_sd15_every
    step host_cost_llama 60 python benchmarks/host_cost.py --only rmsnorm swiglu "lora: fwd+bwd" "frozen Linear"
    ;;
16)
    step paired_2048_structured 280 python benchmarks/paired_steps.py --seq 2048 --rounds 3 \
        --configs loha lokr hra peft-bf16:loha peft-bf16:lokr --out-name paired_2048_structured
    ;;
17)
    # carry .before = the session's first commit (15d056d): LoRA / DoRA now (recipes, fused F.rms_norm) against it
    step lean_llama_cuda_test 90 python -m pytest -q -s tests/core/test_lean_llama_cuda.py
    step paired_512_fused_norm 300 python benchmarks/paired_steps.py --rounds 14 --before .before --configs lora dora \
        before:lora before:dora peft-bf16:lora peft-bf16:dora --out-name paired_512_fused_norm
    ;;
18)
    # issues 19/20, carry .whl and .before = the session's first commit (15d056d): the lean layers as C++ nodes with
    # recipes (core.rebuild), the fused F.rms_norm — CUDA tests, each lean layer's cost, SD-1.5 and 3B seq 512 in
    # paired rounds against that commit and PEFT-bf16
    install_wheels
    step lean_cuda_tests 120 python -m pytest -q -s tests/core/test_lean_llama_cuda.py tests/core/test_lean_layers.py \
        tests/core/test_rebuild.py
    step lean_layer_cost 100 python benchmarks/lean_layer_cost.py
    step paired_sd15_lean_hooks 200 python benchmarks/paired_steps.py --preset stable-diffusion-1.5 --rank 16 \
        --rounds 6 --before .before --configs lora locon loha lokr dora before:lora before:locon peft-bf16:lora \
        peft-bf16:locon peft-bf16:loha peft-bf16:lokr peft-bf16:dora --out-name paired_sd15_lean_hooks
    step paired_512_fused_norm 200 python benchmarks/paired_steps.py --rounds 12 --before .before --configs lora dora \
        before:lora before:dora peft-bf16:lora peft-bf16:dora --out-name paired_512_fused_norm
    ;;
19)
    # issues 19/20, carry .whl and .before = 15d056d: the fused F.rms_norm with the Llama MLP recipe only from
    # MLP_RECIPE_BYTES, the UNet's lean layers as Functions with the blocks' recipes (run 65's), against 15d056d
    install_wheels
    step lean_cuda_tests 120 python -m pytest -q -s tests/core/test_lean_llama_cuda.py tests/core/test_lean_layers.py
    step paired_512_final 150 python benchmarks/paired_steps.py --rounds 12 --before .before --configs lora dora \
        before:lora before:dora peft-bf16:lora peft-bf16:dora --out-name paired_512_final
    step paired_sd15_final 150 python benchmarks/paired_steps.py --preset stable-diffusion-1.5 --rank 16 \
        --rounds 6 --before .before --configs lora locon before:lora before:locon peft-bf16:lora peft-bf16:locon \
        --out-name paired_sd15_final
    ;;
20)
    # issue 19, carry .whl and .before = ca4e9e6: DoRA's step vectors in one launch per forward
    # (methods.dora.prepass) — CUDA tests (DoRA, capture, and the lean layers' float32 bound), host cost per part,
    # 3B seq 512 DoRA / LoRA against ca4e9e6 and PEFT-bf16
    install_wheels
    step dora_cuda_tests 240 python -m pytest -q tests/methods/dora/test_prepass.py tests/methods/dora/test_cuda.py \
        tests/core/test_capture.py tests/core/test_lean_layers.py tests/core/test_lean_llama_cuda.py
    step host_cost_dora 100 python benchmarks/host_cost.py --only "dora one" "dora part" prepass
    step paired_512_prepass 240 python benchmarks/paired_steps.py --rounds 10 --before .before --configs dora \
        before:dora peft-bf16:dora lora peft-bf16:lora --out-name paired_512_prepass
    ;;
21)
    # issues 19/20, carry .whl and .before = ca4e9e6: the pre-pass's tests (interpreter and CUDA), 3B seq 512 every
    # method against PEFT-bf16, SD-1.5 DoRA against ca4e9e6 and PEFT-bf16
    install_wheels
    step prepass_tests 150 python -m pytest -q tests/methods/dora/test_prepass.py tests/methods/dora/test_cuda.py
    step paired_512_every 240 python benchmarks/paired_steps.py --rounds 8 --configs lora dora loha lokr \
        peft-bf16:lora peft-bf16:dora peft-bf16:loha peft-bf16:lokr --out-name paired_512_every
    step paired_sd15_dora 150 python benchmarks/paired_steps.py --preset stable-diffusion-1.5 --rank 16 --rounds 6 \
        --before .before --configs dora before:dora peft-bf16:dora --out-name paired_sd15_dora
    ;;
22)
    # issue 19: torch.compile on both sides at seq 512, DoRA (pre-pass skipped under compile) and LoRA
    step paired_512_compile 540 python benchmarks/paired_steps.py --compile --rounds 6 --configs dora \
        peft-bf16:dora lora peft-bf16:lora --out-name paired_512_compile
    ;;
23)
    # issue 19, carry .before = ca4e9e6: the pre-pass grouped by input width (one launch per d_in) — its tests
    # (interpreter and CUDA), 3B seq 512 DoRA / LoRA / LoKr against ca4e9e6 and PEFT-bf16
    step prepass_tests 150 python -m pytest -q tests/methods/dora/test_prepass.py
    step paired_512_prepass_final 300 python benchmarks/paired_steps.py --rounds 10 --before .before --configs dora \
        before:dora peft-bf16:dora lora peft-bf16:lora lokr peft-bf16:lokr --out-name paired_512_prepass_final
    ;;
24)
    # issue 19, carry .before = ca4e9e6: whether Triton 3.6's interpreter takes the existing kernels' loops (the
    # pre-pass's interpreter tests fail there on `range(0, d_in, ...)`), and DoRA / LoKr at 3B seq 512 in 20 rounds
    step interpreter_36 150 python -m pytest -q tests/methods/dora/test_triton_kernels.py
    step paired_512_dora_20 300 python benchmarks/paired_steps.py --rounds 20 --before .before --configs dora \
        before:dora peft-bf16:dora lokr peft-bf16:lokr --out-name paired_512_dora_20
    ;;
25)
    # issues 19/20, carry .whl and .before = ca4e9e6: the pre-pass's vectors on the "z" route too (layers with a bias,
    # fp16) — DoRA's CUDA tests, SD-1.5 DoRA (to_out / ff layers have biases) and 3B DoRA against ca4e9e6 and PEFT-bf16
    install_wheels
    step dora_cuda_tests 150 python -m pytest -q tests/methods/dora/test_prepass.py tests/methods/dora/test_cuda.py \
        -k "not interpreted and not float64 and not steps_alike and not changed and not checkpointed and not own_norm"
    step paired_sd15_dora_z 200 python benchmarks/paired_steps.py --preset stable-diffusion-1.5 --rank 16 --rounds 8 \
        --before .before --configs dora before:dora peft-bf16:dora --out-name paired_sd15_dora_z
    step paired_512_dora_z 150 python benchmarks/paired_steps.py --rounds 10 --before .before --configs dora \
        before:dora peft-bf16:dora --out-name paired_512_dora_z
    ;;
26)
    # issues 19/20, carry .whl and .before = ca4e9e6: the pre-pass for DoRA convolutions too — the CUDA tests, SD-1.5
    # DoRA (its proj_in / proj_out are 1x1 convolutions) and 3B seq 512 every method against PEFT-bf16
    install_wheels
    step dora_cuda_tests 120 python -m pytest -q tests/methods/dora/test_prepass.py tests/methods/dora/test_cuda.py \
        -k "gpu or bit"
    step paired_sd15_dora_conv 170 python benchmarks/paired_steps.py --preset stable-diffusion-1.5 --rank 16 \
        --rounds 8 --before .before --configs dora before:dora peft-bf16:dora --out-name paired_sd15_dora_conv
    ;;
27)
    # issue 19: torch.compile on both sides at seq 512 for LoHa and LoKr (run 70 had LoRA and DoRA)
    step paired_512_compile_loha_lokr 450 python benchmarks/paired_steps.py --compile --rounds 4 --configs loha \
        peft-bf16:loha lokr peft-bf16:lokr --out-name paired_512_compile_loha_lokr
    ;;
28)
    # issue 19 on the H200 it names (carry .before = ca4e9e6): seq 512 every method against PEFT-bf16 (20 rounds),
    # DoRA at seq 2048 against ca4e9e6 (the pre-pass kernel's GPU time where the GPU decides the step)
    step paired_512_every_h200 420 python benchmarks/paired_steps.py --rounds 20 --configs lora dora loha lokr \
        peft-bf16:lora peft-bf16:dora peft-bf16:loha peft-bf16:lokr --out-name paired_512_every_h200
    step paired_2048_dora 150 python benchmarks/paired_steps.py --seq 2048 --rounds 4 --before .before --configs \
        dora noprepass:dora before:dora peft-bf16:dora --out-name paired_2048_dora
    ;;
29)
    # issues 19/20, carry .whl and .before = 329223c. Issue 20: a UNet's lean layers and recipe scopes only from
    # UNET_LEAN_BYTES (SD-1.5's two finest levels), recipes' hooks entered by their consumers alone — the lean layers'
    # tests on CUDA, SD-1.5 every method against PEFT-bf16 (LoRA against 329223c too). Issue 19: the pre-pass kernel
    # with vector loads (ALIGNED) — its CUDA tests, its GPU time at 3B, DoRA at seq 2048 with and without it
    install_wheels
    step lean_tests 60 python -m pytest -q tests/core/test_lean_layers.py tests/core/test_rebuild.py
    step prepass_cuda_tests 90 python -m pytest -q tests/methods/dora/test_prepass.py -k "gpu or bit"
    step prepass_kernel 60 python benchmarks/prepass_kernel.py
    step paired_2048_dora_aligned 100 python benchmarks/paired_steps.py --seq 2048 --rounds 3 --configs dora \
        noprepass:dora peft-bf16:dora --out-name paired_2048_dora_aligned
    step paired_sd15_lora_locon 150 python benchmarks/paired_steps.py --preset stable-diffusion-1.5 --rank 16 \
        --rounds 6 --before .before --configs lora before:lora peft-bf16:lora locon peft-bf16:locon \
        --out-name paired_sd15_lora_locon
    step paired_sd15_structured 150 python benchmarks/paired_steps.py --preset stable-diffusion-1.5 --rank 16 \
        --rounds 5 --configs loha lokr dora peft-bf16:loha peft-bf16:lokr peft-bf16:dora \
        --out-name paired_sd15_structured
    ;;
30)
    # issue 19 on the H200: torch.compile on both sides for DoRA and LoRA (8 rounds; run 65 had 6), and the
    # 8192x8192 r=384 layer against its GEMM floor (run 62 was on an H100)
    step paired_512_compile_dora_lora 300 python benchmarks/paired_steps.py --compile --rounds 6 --configs dora \
        peft-bf16:dora lora peft-bf16:lora --out-name paired_512_compile_dora_lora
    step layer_compare 120 python benchmarks/layer_compare.py
    ;;
31)
    # issue 20, carry .whl: where SD-1.5's step goes for slimtune (lean layers as in run 78, and stripped of them) and
    # PEFT-bf16 — wall, host queueing, GPU kernel time and count, the kernels that differ most (LoRA; LoKr)
    install_wheels
    step unet_profile_lora 90 python benchmarks/unet_step_profile.py --configs lora stripped:lora peft-bf16:lora
    step unet_profile_lokr 90 python benchmarks/unet_step_profile.py --configs lokr peft-bf16:lokr
    ;;
32)
    # issue 19 on an H200 (PEFT-bf16's DoRA at seq 2048 needs more than an H100's 80 GB): DoRA with the aligned
    # pre-pass kernel, without the pre-pass, and PEFT-bf16 (run 76 had the kernel before its vector loads)
    step paired_2048_dora_h200 200 python benchmarks/paired_steps.py --seq 2048 --rounds 3 --configs dora \
        noprepass:dora peft-bf16:dora --out-name paired_2048_dora_h200
    ;;
33)
    # issue 20, carry .whl and .before = 6debeda: the lean convolution's backward as a transposed convolution (its
    # CUDA tests: bit for bit against autograd), SD-1.5 LoRA with and without sibling fusion against 6debeda and
    # PEFT-bf16, LoCon, and LoHa / LoKr / DoRA against PEFT-bf16
    install_wheels
    step lean_tests 60 python -m pytest -q tests/core/test_lean_layers.py tests/core/test_rebuild.py
    step paired_sd15_lora_alone 170 python benchmarks/paired_steps.py --preset stable-diffusion-1.5 --rank 16 \
        --rounds 6 --before .before --configs lora alone:lora before:lora peft-bf16:lora locon peft-bf16:locon \
        --out-name paired_sd15_lora_alone
    step paired_sd15_structured 150 python benchmarks/paired_steps.py --preset stable-diffusion-1.5 --rank 16 \
        --rounds 5 --configs loha lokr dora peft-bf16:loha peft-bf16:lokr peft-bf16:dora \
        --out-name paired_sd15_structured
    ;;
34)
    # issue 20, carry .whl and .before = 6debeda: part 33 again in more rounds (run 84's 6 rounds on a noisy host had
    # interquartile ranges of ±20%), with a recipe rebuilt once for all its consumers (LoCon's base and down
    # convolutions) and the lean convolution's backward as autograd's own op (its CUDA test: bit for bit)
    install_wheels
    step lean_tests 60 python -m pytest -q tests/core/test_lean_layers.py tests/core/test_rebuild.py \
        tests/core/test_aten_grads.py
    step paired_sd15_lora_30 200 python benchmarks/paired_steps.py --preset stable-diffusion-1.5 --rank 16 \
        --rounds 30 --before .before --configs lora alone:lora before:lora peft-bf16:lora locon before:locon \
        peft-bf16:locon --out-name paired_sd15_lora_30
    step paired_sd15_structured_20 200 python benchmarks/paired_steps.py --preset stable-diffusion-1.5 --rank 16 \
        --rounds 20 --configs loha lokr dora peft-bf16:loha peft-bf16:lokr peft-bf16:dora \
        --out-name paired_sd15_structured_20
    ;;
35)
    # issue 20: the lean convolution's backward against autograd's under cuDNN's deterministic algorithms (its CUDA
    # test), and whether autograd's own gradient repeats under the default ones (runs 85 and 87 saw float64 / 3-D
    # differ)
    step aten_grads_tests 60 python -m pytest -q tests/core/test_aten_grads.py
    step cudnn_repeat 60 python benchmarks/cudnn_repeat.py
    ;;
36)
    # issue 20, carry .whl: SD-1.5 LoKr's path per layer — the chooser's pick (structured or folded by counted FLOPs
    # and bytes), every layer folded, every layer structured — against PEFT-bf16 (the CPU proxy has folded 9% faster)
    install_wheels
    step paired_sd15_lokr_paths 300 python benchmarks/paired_steps.py --preset stable-diffusion-1.5 --rank 16 \
        --rounds 20 --configs lokr folded:lokr structured:lokr peft-bf16:lokr --out-name paired_sd15_lokr_paths
    ;;
37)
    # issue 20, carry .whl: SD-1.5 LoKr and LoHa with the structured layers' path choice asked without building the
    # timed criterion's key on every call (run 89: the chosen paths were 5% slower than either path everywhere), the
    # paths forced, LoRA again; each against PEFT-bf16
    install_wheels
    step paired_sd15_lokr_choice 400 python benchmarks/paired_steps.py --preset stable-diffusion-1.5 --rank 16 \
        --rounds 25 --configs lokr folded:lokr structured:lokr peft-bf16:lokr loha peft-bf16:loha lora \
        peft-bf16:lora --out-name paired_sd15_lokr_choice
    ;;
38)
    # issue 20, carry .whl and .before = 6debeda: a frozen ResNet block as one autograd Function
    # (core.lean_resnet) and diffusers' Attention without its per-call signature inspection — the lean tests on CUDA
    # (bit for bit against the plain UNet), SD-1.5 every method against 6debeda (LoRA, LoCon) and PEFT-bf16
    install_wheels
    step lean_tests 90 python -m pytest -q tests/core/test_lean_layers.py tests/core/test_lean_resnet.py \
        tests/core/test_rebuild.py tests/core/test_aten_grads.py
    step paired_sd15_resnet 360 python benchmarks/paired_steps.py --preset stable-diffusion-1.5 --rank 16 \
        --rounds 20 --before .before --configs lora before:lora peft-bf16:lora locon before:locon peft-bf16:locon \
        loha peft-bf16:loha lokr peft-bf16:lokr dora peft-bf16:dora --out-name paired_sd15_resnet
    ;;
39)
    # issue 20, carry .whl and .before = 6debeda: part 38 cut to fit a short lease — the lean tests on CUDA, SD-1.5
    # LoRA and LoKr against 6debeda and PEFT-bf16
    install_wheels
    step lean_tests 90 python -m pytest -q tests/core/test_lean_resnet.py tests/core/test_lean_layers.py \
        tests/core/test_aten_grads.py
    step paired_sd15_final 200 python benchmarks/paired_steps.py --preset stable-diffusion-1.5 --rank 16 \
        --rounds 15 --before .before --configs lora before:lora peft-bf16:lora lokr before:lokr peft-bf16:lokr \
        --out-name paired_sd15_final
    ;;
40)
    # issue 20, carry .whl and .before = 8def1c5: LoRA's, LoHa's and LoKr's Functions keep an offered input's recipe
    # themselves (core.rebuild.keep_input: no saved-tensor hooks), diffusers' default attention processor's body without
    # its no-op steps (core.attention_call), a ResNet block with LoCon as one Function (core.lean_resnet) — the CUDA
    # tests (bit for bit against the plain layers), SD-1.5 LoRA, LoCon and LoKr against 8def1c5 and PEFT-bf16, and
    # QLoRA (NF4 base weights) against PEFT-bf16 (bitsandbytes)
    install_wheels
    step lean_tests 120 python -m pytest -q tests/core/test_attention_call.py tests/core/test_rebuild.py \
        tests/core/test_lean_layers.py tests/core/test_lean_resnet.py tests/core/test_aten_grads.py
    step paired_sd15_direct 300 python benchmarks/paired_steps.py --preset stable-diffusion-1.5 --rank 16 \
        --rounds 15 --before .before --configs lora before:lora peft-bf16:lora locon before:locon \
        peft-bf16:locon lokr before:lokr peft-bf16:lokr --out-name paired_sd15_direct
    step paired_sd15_qlora 150 python benchmarks/paired_steps.py --preset stable-diffusion-1.5 --rank 16 \
        --rounds 10 --quant nf4 --configs lora peft-bf16:lora --out-name paired_sd15_qlora
    ;;
41)
    # issue 20, carry .whl and .before = 5853aec (the previous session's last code, which part 40 measures): LoKr's
    # convolution backward through w2's adjoint (methods.lokr.ops.LokrConvOp) — the CUDA tests, SD-1.5 LoRA, LoCon
    # (both unchanged since 5853aec: the rounds' controls) and LoKr against 5853aec and PEFT-bf16, LoKr's and
    # PEFT-bf16's step split into GPU kernels, CUDA runtime calls, ATen ops' host time and garbage collections, and
    # each block kind's fwd+bwd against PEFT-bf16 and 5853aec (block_compare.py).
    # On an H200, first what issue 19 still needs there (compiled DoRA on both sides; the 8192 r=384 layer), and
    # then the profile and block comparison are left out (one call's 10 minutes)
    h200=0
    nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && h200=1
    if [ $h200 = 1 ]; then
        step paired_512_compile_dora 200 python benchmarks/paired_steps.py --compile --rounds 6 --configs dora \
            peft-bf16:dora --out-name paired_512_compile_dora
        step layer_compare 80 python benchmarks/layer_compare.py
    fi
    install_wheels
    step cuda_tests 45 python -m pytest -q tests/core/test_lean_resnet.py tests/core/test_structured.py \
        tests/core/test_aten_grads.py tests/core/test_attention_call.py
    step paired_sd15_session 200 python benchmarks/paired_steps.py --preset stable-diffusion-1.5 --rank 16 \
        --rounds 12 --before .before --configs lora before:lora peft-bf16:lora locon before:locon \
        peft-bf16:locon lokr before:lokr peft-bf16:lokr --out-name paired_sd15_session
    if [ $h200 = 0 ]; then
        step unet_profile_lokr 80 python benchmarks/unet_step_profile.py --configs lokr peft-bf16:lokr
        step block_compare 90 python benchmarks/block_compare.py --methods lora lokr --rounds 8 --before .before
    fi
    (cd "$out" && tar -cf jsonl.tar ./*.jsonl && rm -f ./*.jsonl)  # one file back for all of them (8 files at most)
    ;;
42)
    # issue 20, carry .whl and .before = 5853aec: part 41 for a lease of ~5 minutes — the CUDA tests of the changed
    # Functions, SD-1.5 LoCon and LoKr against 5853aec and PEFT-bf16, LoRA against PEFT-bf16
    install_wheels
    step cuda_tests 40 python -m pytest -q tests/core/test_lean_resnet.py tests/core/test_structured.py
    step paired_sd15_short 200 python benchmarks/paired_steps.py --preset stable-diffusion-1.5 --rank 16 \
        --rounds 10 --before .before --configs locon before:locon peft-bf16:locon lokr before:lokr peft-bf16:lokr \
        lora peft-bf16:lora --out-name paired_sd15_short
    ;;
43)
    # issue 19 on an H200 (call with needs_h200: PEFT-bf16's DoRA at seq 2048 needs more than an H100's 80 GB), in
    # about 8 minutes: compiled DoRA against compiled PEFT-bf16 (the criterion still unmet there), the 8192 r=384
    # layer against its GEMM floor, then part 32 (DoRA at seq 2048 with and without the pre-pass, and PEFT-bf16)
    step paired_512_compile_dora 200 python benchmarks/paired_steps.py --compile --rounds 6 --configs dora \
        peft-bf16:dora --out-name paired_512_compile_dora
    step layer_compare 80 python benchmarks/layer_compare.py
    step paired_2048_dora_h200 200 python benchmarks/paired_steps.py --seq 2048 --rounds 3 --configs dora \
        noprepass:dora peft-bf16:dora --out-name paired_2048_dora_h200
    ;;
44)
    # issue 20, carry .whl and .before = this checkout's own package (`git archive HEAD slimtune`, renamed), about 4
    # minutes: LoKr's step with the UNet lean layers from 16 MiB (before:lokr) against the default 4 MiB and
    # PEFT-bf16 in paired rounds — RESULTS.md run 104 counts LoKr's saved activations there at 0.60 of PEFT-bf16's
    # (0.44 at 4 MiB), LoRA's and LoCon's at 0.83-0.84, too close to PEFT's for issue 20 — then SD-1.5 with no
    # lean layer at all, and the ResNet blocks with and without them, with kernel tables
    install_wheels
    step paired_sd15_lokr_16mib 120 python benchmarks/paired_steps.py --preset stable-diffusion-1.5 --rank 16 \
        --rounds 16 --before .before --before-unet-lean-bytes 16777216 --configs lokr before:lokr peft-bf16:lokr \
        --out-name paired_sd15_lokr_16mib
    step paired_sd15_no_lean 130 python benchmarks/paired_steps.py --preset stable-diffusion-1.5 --rank 16 \
        --rounds 8 --unet-lean-bytes 4611686018427387904 --configs lora peft-bf16:lora locon peft-bf16:locon lokr \
        peft-bf16:lokr --out-name paired_sd15_no_lean
    step block_lean 100 python benchmarks/block_compare.py --methods lora lokr --cases "ResNet block" \
        --rounds 6 --lean-off --profile
    ;;
45)
    # issue 20, carry .whl (about 3 minutes): SD-1.5's step replayed as a CUDA graph on both sides
    # (slimtune.capture_step, PEFT's too): with the host's queueing gone, the GPU's work decides, where run 102's
    # profile has slimtune's LoKr at 70.0 ms of kernels against PEFT-bf16's 96.7
    install_wheels
    step paired_sd15_captured 200 python benchmarks/paired_steps.py --preset stable-diffusion-1.5 --rank 16 \
        --rounds 8 --capture --configs lora peft-bf16:lora locon peft-bf16:locon lokr peft-bf16:lokr \
        --out-name paired_sd15_captured
    ;;
46)
    # issue 20 on an H200 (needs_h200 only so that the card is the one the issue names), carry .whl and .before =
    # 90e6890 (LoKr's UNet lean layers from 4 MiB; now 16 MiB, RESULTS.md run 105), about 6 minutes: the lean layers'
    # tests on CUDA, SD-1.5 every method against PEFT-bf16 in paired rounds, then LoRA / LoCon / LoKr replayed as CUDA
    # graphs on both sides, each capture's transient peak beside its time
    install_wheels
    step cuda_tests 90 python -m pytest -q tests/core/test_lean_layers.py tests/core/test_lean_resnet.py \
        tests/core/test_capture.py tests/train/test_capture_cuda.py
    step paired_sd15_every_h200 300 python benchmarks/paired_steps.py --preset stable-diffusion-1.5 --rank 16 \
        --rounds 12 --before .before --configs lora locon loha lokr dora before:lokr peft-bf16:lora \
        peft-bf16:locon peft-bf16:loha peft-bf16:lokr peft-bf16:dora --out-name paired_sd15_every_h200
    step paired_sd15_captured_h200 150 python benchmarks/paired_steps.py --preset stable-diffusion-1.5 --rank 16 \
        --rounds 6 --capture --configs lora peft-bf16:lora locon peft-bf16:locon lokr peft-bf16:lokr \
        --out-name paired_sd15_captured_h200
    ;;
47)
    # `slimtune train --capture` (carry .whl; about 3 minutes): its CUDA tests, then SD-1.5 LoRA and LoKr trained
    # 40 steps eager and captured (random weights and samples; the run's own tokens/s and peak, the first step's
    # capture included in the elapsed time)
    install_wheels
    step cuda_tests 90 python -m pytest -q tests/core/test_capture.py tests/train/test_capture_cuda.py
    for method in lora lokr; do
        for mode in "" --capture; do
            step "train_sd15_${method}${mode:-_eager}" 150 python -m slimtune train --task diffusion \
                --preset stable-diffusion-1.5 --method $method --rank 16 --batch 4 --max-steps 40 --save-every 0 \
                --log-every 10 --json --out "/tmp/train_${method}${mode:-_eager}" $mode
        done
    done
    ;;
48)
    # issue 19 on an H200 (about 8 minutes, carry .whl): torch.compile on both sides at seq 512 with every layer
    # compiled — before, each layer's lean forward object (slimtune) and KV cache update (both sides) was a guard of
    # its own, Dynamo hit its recompile limit of 8 and ran the other 20 layers eagerly (runs 80, 84, 107) — then
    # part 47 (`slimtune train --capture`)
    step paired_512_compile_all_layers 300 python benchmarks/paired_steps.py --compile --rounds 6 --configs lora \
        dora peft-bf16:lora peft-bf16:dora --out-name paired_512_compile_all_layers
    bash "$0" 47
    ;;
49)
    # issue 19 (about 2 minutes; any GPU): where compiled DoRA's step goes against compiled PEFT-bf16's (run 108:
    # 1.19x) — wall, host and GPU kernel time, the kernels differing most
    step profile_compiled_dora 150 python benchmarks/unet_step_profile.py --preset llama-3.2-3b --rank 32 \
        --batch 4 --compile --steps 3 --configs dora peft-bf16:dora
    ;;
50)
    # issue 19 on an H200 (about 5 minutes): LoHa and LoKr compiled on both sides with every layer in the graph
    # (their compiled ratios so far, runs 65 and 76-77, compiled 8 of 28 layers)
    step paired_512_compile_loha_lokr_all_layers 400 python benchmarks/paired_steps.py --compile --rounds 6 \
        --configs loha lokr peft-bf16:loha peft-bf16:lokr --out-name paired_512_compile_loha_lokr_all_layers
    ;;
51)
    # issue 20 on the H200 it names (needs_h200, carry .whl; about 5 minutes): SD-1.5 every method with both
    # libraries' steps replayed as CUDA graphs (run 106 captured LoRA / LoCon / LoKr: 0.99 / 0.99 / 0.72 of
    # PEFT-bf16 at 0.62-0.68 of its peak; LoKr is the one method over PEFT's eager step)
    install_wheels
    step paired_sd15_every_captured_h200 400 python benchmarks/paired_steps.py --preset stable-diffusion-1.5 \
        --rank 16 --rounds 6 --capture --configs lora locon loha lokr dora peft-bf16:lora peft-bf16:locon \
        peft-bf16:loha peft-bf16:lokr peft-bf16:dora --out-name paired_sd15_every_captured_h200
    ;;
52)
    # issue 19 on an H200 (about 5 minutes): DoRA and LoRA compiled on both sides after the DoRA pre-pass stopped
    # forming step vectors for compiled layers (which never used them: run 108's DoRA launched it every step) and
    # the floors table stopped causing a recompile; Dynamo's recompiles logged
    TORCH_LOGS=recompiles step paired_512_compile_dora_no_prepass 420 python benchmarks/paired_steps.py --compile \
        --rounds 8 --configs dora peft-bf16:dora lora peft-bf16:lora --out-name paired_512_compile_dora_no_prepass
    ;;
53)
    # issue 20 on the H200 it names, the short form of part 51 (needs_h200, carry .whl; about 3 minutes): the two
    # methods run 106 did not capture, LoHa and DoRA, with both libraries' SD-1.5 steps replayed as CUDA graphs
    install_wheels
    step paired_sd15_loha_dora_captured_h200 300 python benchmarks/paired_steps.py --preset stable-diffusion-1.5 \
        --rank 16 --rounds 6 --capture --configs loha dora peft-bf16:loha peft-bf16:dora \
        --out-name paired_sd15_loha_dora_captured_h200
    ;;
54)
    # issue 20 on the H200 it names (needs_h200, carry .whl and .before = the code before the change, `git archive`
    # of its commit; about 4 minutes): LoKr's convolution backward now makes one convolution-backward call for w2's
    # convolution (input and weight gradients at input w1 X) where it made two, as many as PEFT's dense delta
    # convolution; its CUDA tests, SD-1.5 LoKr against the code before and PEFT-bf16 in paired rounds, then
    # LoKr without any lean layer (the eager step's other lever, run 105) against PEFT-bf16
    install_wheels
    step cuda_tests 90 python -m pytest -q tests/methods/lokr tests/core/test_aten_grads.py
    step paired_sd15_lokr_conv_backward 200 python benchmarks/paired_steps.py --preset stable-diffusion-1.5 \
        --rank 16 --rounds 16 --before .before --configs lokr before:lokr peft-bf16:lokr \
        --out-name paired_sd15_lokr_conv_backward
    step paired_sd15_lokr_no_lean 120 python benchmarks/paired_steps.py --preset stable-diffusion-1.5 --rank 16 \
        --rounds 10 --unet-lean-bytes 4611686018427387904 --configs lokr peft-bf16:lokr \
        --out-name paired_sd15_lokr_no_lean
    ;;
55)
    # issue 20 (about 5 minutes; the H200 where it starts): run 115's host moved steps by up to 2x between rounds,
    # so 48 rounds each. carry .whl, .before = the code before LoKr's convolution backward changed (68ef69b) and
    # .before_new = this checkout's own package (`git archive HEAD slimtune`, renamed, in .before_new/slimtune_before):
    # LoKr against the code before and PEFT-bf16, then LoKr with its lean layers (from 16 MiB) against itself
    # without any and PEFT-bf16 in the same rounds (run 115 had them in separate runs)
    install_wheels
    step cuda_tests 90 python -m pytest -q tests/methods/lokr
    step paired_sd15_lokr_conv_48 240 python benchmarks/paired_steps.py --preset stable-diffusion-1.5 --rank 16 \
        --rounds 48 --before .before --configs lokr before:lokr peft-bf16:lokr --out-name paired_sd15_lokr_conv_48
    step paired_sd15_lokr_lean_48 240 python benchmarks/paired_steps.py --preset stable-diffusion-1.5 --rank 16 \
        --rounds 48 --before .before_new --before-unet-lean-bytes 4611686018427387904 --configs lokr before:lokr \
        peft-bf16:lokr --out-name paired_sd15_lokr_lean_48
    ;;
56)
    # issue 20 on the H200 it names (needs_h200; carry .whl and .before = 68ef69b, the code before LoKr's
    # convolution backward changed; about 7 minutes): part 55's first paired run, then part 53's captured LoHa / DoRA.
    # LOKR_ROUNDS / CAPTURED_ROUNDS (48 / 6) set the rounds: part 58 runs it with fewer
    lokr_rounds=${LOKR_ROUNDS:-48} captured_rounds=${CAPTURED_ROUNDS:-6}
    install_wheels
    step "paired_sd15_lokr_conv_${lokr_rounds}_h200" 200 python benchmarks/paired_steps.py \
        --preset stable-diffusion-1.5 --rank 16 --rounds "$lokr_rounds" --before .before \
        --configs lokr before:lokr peft-bf16:lokr --out-name "paired_sd15_lokr_conv_${lokr_rounds}_h200"
    step paired_sd15_loha_dora_captured_h200 280 python benchmarks/paired_steps.py --preset stable-diffusion-1.5 \
        --rank 16 --rounds "$captured_rounds" --capture --configs loha dora peft-bf16:loha peft-bf16:dora \
        --out-name paired_sd15_loha_dora_captured_h200
    ;;
57)
    # issue 19 (about 2 minutes; any GPU, carry .whl): `slimtune train --capture` where no GPU run has taken it yet —
    # an NF4 base with evaluation every 5 steps (tiny-llama, QLoRA), a DiT (tiny-dit, HRA) and SD-1.5's layout with
    # LoKr (tiny-sd15) — each eager and captured with the same seed; the JSON lines' losses side by side
    install_wheels
    python3 - <<'PY'
import json
with open("/tmp/pending_text.jsonl", "w") as f:
    for i in range(96):
        f.write(json.dumps({"text": f"sample {i} says hello world. " * 6}) + "\n")
PY
    for mode in "" --capture; do
        name=${mode:+_captured}
        name=${name:-_eager}
        step "train_nf4_eval${name}" 120 python -m slimtune train --preset tiny-llama --quant nf4 \
            --data /tmp/pending_text.jsonl --eval-fraction 0.1 --eval-every 5 --max-steps 20 --batch 4 --seq 256 \
            --save-every 0 --log-every 5 --json --out "/tmp/train_nf4${name}" $mode
        step "train_tiny_dit_hra${name}" 120 python -m slimtune train --task diffusion --preset tiny-dit \
            --method hra --rank 8 --max-steps 20 --save-every 0 --log-every 5 --json --out "/tmp/train_dit${name}" $mode
        step "train_tiny_sd15_lokr${name}" 120 python -m slimtune train --task diffusion --preset tiny-sd15 \
            --method lokr --rank 4 --max-steps 20 --save-every 0 --log-every 5 --json \
            --out "/tmp/train_sd15${name}" $mode
    done
    ;;
58)
    # part 56's short form (needs_h200; carry .whl and .before = 68ef69b; about 5 minutes): 32 LoKr rounds, 4 captured
    LOKR_ROUNDS=32 CAPTURED_ROUNDS=4 bash "$0" 56
    ;;
59)
    # issue 19 (about 7 minutes; the H200 where it starts): compiled layers now run q/k/v and gate/up as one Function
    # where an eager first step learnt them (before, every member ran alone under compile). LoRA compiled on both
    # sides at seq 512 — fused, alone:lora (each member alone, the code before) and PEFT-bf16 — in paired rounds;
    # then the compiled steps' kernels, host and GPU time side by side
    step paired_512_compile_lora_siblings 360 python benchmarks/paired_steps.py --compile --rounds 10 \
        --configs lora alone:lora peft-bf16:lora --out-name paired_512_compile_lora_siblings
    step profile_compiled_lora_siblings 150 python benchmarks/unet_step_profile.py --preset llama-3.2-3b --rank 32 \
        --batch 4 --compile --steps 3 --configs lora alone:lora peft-bf16:lora
    ;;
60)
    # issue 19 (about 4 minutes, carry .before = e368713, the code before; any GPU): LoRA's sums under compile out of
    # place as views (core.compute.add_product), where Inductor copied y for each extern addmm (run 120: 389 copies
    # a step). The four forms of one layer's sums compiled; LoRA compiled against the code before and PEFT-bf16 in
    # paired rounds; the compiled steps profiled
    step compiled_sum_forms 120 python benchmarks/compiled_sum_forms.py
    step paired_512_compile_lora_sums 300 python benchmarks/paired_steps.py --compile --rounds 12 --before .before \
        --configs lora before:lora peft-bf16:lora --out-name paired_512_compile_lora_sums
    step profile_compiled_lora_sums 150 python benchmarks/unet_step_profile.py --preset llama-3.2-3b --rank 32 \
        --batch 4 --compile --steps 3 --configs lora peft-bf16:lora
    ;;
61)
    # issue 19 (about 3 minutes, carry .before = 60d2260, the code before; any GPU): DoRA's product and dx sums
    # under compile out of place as views (core.compute.add_product), as LoRA's in part 60; DoRA compiled against
    # the code before and PEFT-bf16 in paired rounds, then profiled against PEFT-bf16
    step paired_512_compile_dora_sums 240 python benchmarks/paired_steps.py --compile --rounds 12 --before .before \
        --configs dora before:dora peft-bf16:dora --out-name paired_512_compile_dora_sums
    step profile_compiled_dora_sums 150 python benchmarks/unet_step_profile.py --preset llama-3.2-3b --rank 32 \
        --batch 4 --compile --steps 3 --before .before --configs dora before:dora peft-bf16:dora
    ;;
62)
    # issue 19 (about 4 minutes; the H200 where it starts): HRA compiled on both sides, as run 126 tried; a side that
    # runs out of memory is now dropped and named, the other's steps go on, so the run says which side it was. Then
    # slimtune's HRA compiled alone, profiled (its graph's kernels and peak)
    step paired_512_compile_hra 300 python benchmarks/paired_steps.py --compile --rounds 6 \
        --configs hra peft-bf16:hra --out-name paired_512_compile_hra
    step profile_compiled_hra 150 python benchmarks/unet_step_profile.py --preset llama-3.2-3b --rank 32 \
        --batch 4 --compile --steps 3 --configs hra
    ;;
63)
    # issue 19 (about 6 minutes; the H200 where it starts): LoRA and DoRA compiled against PEFT-bf16 with turns of 3
    # steps (the first untimed), as one model's training loop runs. Run 122's profile had LoRA's compiled step at
    # 69.9 ms wall against PEFT-bf16's 84.8 (0.82x), its paired rounds of one step at 98 against 100 ms (0.94x):
    # every step there ran right after another model's
    step paired_512_compile_turns3_lora 270 python benchmarks/paired_steps.py --compile --rounds 8 \
        --steps-per-turn 3 --configs lora peft-bf16:lora --out-name paired_512_compile_turns3_lora
    step paired_512_compile_turns3_dora 270 python benchmarks/paired_steps.py --compile --rounds 8 \
        --steps-per-turn 3 --configs dora peft-bf16:dora --out-name paired_512_compile_turns3_dora
    ;;
64)
    # issue 19 (about 7 minutes, any GPU): the floor under LoRA's step — the same model with its adapters taken out
    # and one trained scalar on the embeddings (paired_steps.py floor:lora) — and LoRA with the loss slimtune train
    # takes (trainloss:lora: no full logits), compiled in turns of 3 steps and eager, beside slimtune's and
    # PEFT-bf16's LoRA (and DoRA eager); then the compiled steps profiled kernel by kernel
    step paired_512_compile_turns3_floor 230 python benchmarks/paired_steps.py --compile --rounds 8 \
        --steps-per-turn 3 --configs lora trainloss:lora floor:lora peft-bf16:lora \
        --out-name paired_512_compile_turns3_floor
    step paired_512_eager_turns3_floor 150 python benchmarks/paired_steps.py --rounds 10 --steps-per-turn 3 \
        --configs lora trainloss:lora dora floor:lora peft-bf16:lora peft-bf16:dora \
        --out-name paired_512_eager_turns3_floor
    step profile_compiled_floor 200 python benchmarks/unet_step_profile.py --preset llama-3.2-3b --rank 32 \
        --batch 4 --compile --steps 3 --top 12 --configs lora trainloss:lora floor:lora peft-bf16:lora
    ;;
65)
    # slimtune train's loss (about 2 minutes, any GPU): the chunked loss's Triton kernel (one launch per chunk) —
    # its CUDA tests, then forward and backward at Llama-3.2-3B's head against transformers' loss and the
    # reference chunk, at seq 512 and 2048 (batch 4)
    step cuda_tests_chunked_loss 120 python -m pytest -q tests/memory/test_chunked_loss_cuda.py \
        tests/memory/test_chunked_loss.py -k "not interpreted"
    step loss_compare_512 60 python benchmarks/loss_compare.py
    step loss_compare_2048 90 python benchmarks/loss_compare.py --rows 8188 --rounds 10
    ;;
66)
    # slimtune train's loss in the 3B step (about 4 minutes, any GPU): the chunked loss with ignored rows masked on
    # CUDA (no host synchronisation), LoRA compiled in turns of 3 steps and eager, beside the protocol's loss and
    # PEFT-bf16
    step paired_512_compile_turns3_trainloss 200 python benchmarks/paired_steps.py --compile --rounds 8 \
        --steps-per-turn 3 --configs lora trainloss:lora peft-bf16:lora --out-name paired_512_compile_turns3_trainloss
    step paired_512_eager_turns3_trainloss 120 python benchmarks/paired_steps.py --rounds 8 --steps-per-turn 3 \
        --configs lora trainloss:lora peft-bf16:lora --out-name paired_512_eager_turns3_trainloss
    ;;
67)
    # issue 19 (about 2 minutes, any GPU; ran as RESULTS.md run 135): the skinny GEMMs of LoRA's backward at the 3B
    # shape, timed as CUDA graphs (the GPU's time alone; eagerly, back-to-back calls time the host), each in the
    # layouts that give the same product; then the chunked loss's CUDA tests (the one that the loss never
    # synchronises among them) and its interpreted test under this machine's Triton (3.6: fails, run 130)
    step skinny_gemm_forms 120 python benchmarks/skinny_gemm_forms.py
    step cuda_tests_chunked_loss 150 python -m pytest -q tests/memory/test_chunked_loss_cuda.py \
        tests/memory/test_chunked_loss.py
    ;;
68)
    # issue 19 (about 8 minutes, any GPU; ran as RESULTS.md run 137): the prototype stacked:lora (since removed: now
    # slimtune.core.stacked_rows, which compile_layers applies, and paired_steps.py's stacked:lora stacks eagerly; each sibling
    # chain's frozen weights and A's in one buffer, one GEMM for the chain's base outputs and x Aᵀ) against slimtune's
    # LoRA and PEFT-bf16, compiled and eager, in turns of 3 steps — what fewer GEMM calls a layer buy (run 135). Run
    # 136 ran it on a noisy H100 (eager 0.946x LoRA; compiled within the noise). Since 2026-12-06 (tenth session)
    # the prototype also takes backward's dx from one GEMM against the rows, and stacks o and down as chains of one:
    # its compiled layer runs 11 + 22 GEMMs against LoRA's 18 + 29 (CPU output code)
    step paired_512_compile_turns3_stacked 330 python benchmarks/paired_steps.py --compile --rounds 8 \
        --steps-per-turn 3 --configs lora stacked:lora peft-bf16:lora --out-name paired_512_compile_turns3_stacked
    step paired_512_eager_turns3_stacked 150 python benchmarks/paired_steps.py --rounds 8 --steps-per-turn 3 \
        --configs lora stacked:lora peft-bf16:lora --out-name paired_512_eager_turns3_stacked
    ;;
69)
    # issue 19 (about 5 minutes, any GPU): where the GPU waits in a compiled 3B step (benchmarks/step_gaps.py: each
    # idle gap between kernels attributed to its phase and to the host op that launched the kernel ending it) —
    # slimtune's LoRA, the stacked prototype, the floor and PEFT-bf16; run 132 has compiled LoRA's GPU idle for
    # about 5.8 ms of a 66.9 ms step
    step step_gaps_compiled 420 python benchmarks/step_gaps.py --compile \
        --configs lora stacked:lora floor:lora peft-bf16:lora
    ;;
70)
    # issue 19 (about 4 minutes, carry .before = 1a25d78, the code before; any GPU): compile_layers with stacked rows
    # (slimtune.core.stacked_rows) — LoRA compiled against the code before and PEFT-bf16 in turns of 3 steps; then
    # eager, LoRA with its chains stacked (stacked:lora) against LoRA and PEFT-bf16
    step paired_512_compile_turns3_stackedlib 300 python benchmarks/paired_steps.py --compile --rounds 12 \
        --steps-per-turn 3 --before .before --configs lora before:lora peft-bf16:lora \
        --out-name paired_512_compile_turns3_stackedlib
    step paired_512_eager_turns3_stackedlib 150 python benchmarks/paired_steps.py --rounds 10 --steps-per-turn 3 \
        --configs lora stacked:lora peft-bf16:lora --out-name paired_512_eager_turns3_stackedlib
    ;;
72)
    # issue 19 on an H200 (about 5 minutes; the card where it starts): LoRA and DoRA compiled and eager against
    # PEFT-bf16 in turns of 3 steps, with stacked rows and dx from [dy_1, …, dy_n] (8f87d9c); on an H100 the compiled
    # LoRA step was GPU-bound at 0.92-0.94x (runs 139-141), on an H200 the GPU's share is smaller
    step paired_512_compile_turns3_h200 300 python benchmarks/paired_steps.py --compile --rounds 8 \
        --steps-per-turn 3 --configs lora dora peft-bf16:lora peft-bf16:dora --out-name paired_512_compile_turns3_h200
    step paired_512_eager_turns3_h200 150 python benchmarks/paired_steps.py --rounds 8 --steps-per-turn 3 \
        --configs lora dora peft-bf16:lora peft-bf16:dora --out-name paired_512_eager_turns3_h200
    ;;
73)
    # issue 19 (about 5 minutes, carry .before = dc2da9c, the code before; any GPU): the stacked Function forms every
    # member's product before any sum (traced), so that Inductor fuses gate's sum into the SwiGLU kernel beside up's
    # (run 142: gate's stand-alone sum 1.07 ms a 3B step; seen in the CPU output code); and, since 2026-12-06
    # (twelfth session), a chain of one (o, down) takes dx from one GEMM, [dy, g] S, where down's g A [N, 8192] was
    # written and read back by SiLU's backward (run 142: 2.20 ms against the floor's 1.44) — LoRA compiled against
    # the code before and PEFT-bf16 in turns of 3 steps, then the compiled steps profiled (the kernels tell the two
    # changes apart: gate's sum, SiLU's forward and backward, 2 GEMMs fewer a layer)
    step paired_512_compile_turns3_sums_last 300 python benchmarks/paired_steps.py --compile --rounds 16 \
        --steps-per-turn 3 --before .before --configs lora before:lora peft-bf16:lora \
        --out-name paired_512_compile_turns3_sums_last
    step profile_compiled_sums_last 150 python benchmarks/unet_step_profile.py --preset llama-3.2-3b --rank 32 \
        --batch 4 --compile --steps 3 --top 30 --before .before --configs lora before:lora peft-bf16:lora
    ;;
74)
    # issue 19 (about 5 minutes, carry .before = 51e2c36, the code before; any GPU): gate/up stacked wide
    # (slimtune.core.wide_rows: each member's weight and B one matrix against [s·h_1, x, s·h_2], so the outputs
    # SwiGLU keeps come from the GEMMs and no [N, 8192] product is written and summed; run 144 had gate/up's forward
    # kernels at 2.82 ms a step against the frozen model's 1.12) — the CUDA tests (bf16, eager and Inductor), LoRA
    # compiled against the code before and PEFT-bf16 in turns of 3 steps (the losses against the code before's: the
    # end-to-end check at the 3B shape), then the compiled steps profiled
    step wide_cuda_tests 90 python -m pytest -q tests/core/test_wide_rows.py -k bf16_on_cuda
    step paired_512_compile_turns3_wide 300 python benchmarks/paired_steps.py --compile --rounds 12 \
        --steps-per-turn 3 --before .before --configs lora before:lora peft-bf16:lora \
        --out-name paired_512_compile_turns3_wide
    step profile_compiled_wide 150 python benchmarks/unet_step_profile.py --preset llama-3.2-3b --rank 32 \
        --batch 4 --compile --steps 3 --top 30 --before .before --configs lora before:lora peft-bf16:lora
    ;;
75)
    # issue 19 (about 4 minutes, any GPU): why compiled DoRA does not train on CUDA (run 145: the loss never moved
    # over 33 steps, transient peak 3.66 GiB, in every compiled DoRA run since 108; the CPU trains). Each case: the
    # losses, and after the first two backward passes the trainable tensors without a gradient and the gradients'
    # norms; toggles: the step-vector pre-pass off, bf16 GEMMs with fp32 output off, sibling fusion off, the fp32
    # GEMM probed eagerly (ran as RESULTS.md run 146: the gradients were zero in every case)
    step compiled_training_check 280 python benchmarks/compiled_training_check.py --steps 3 --cases \
        tiny-llama:dora:bfloat16:compiled tiny-llama:dora:bfloat16:compiled:noprepass \
        tiny-llama:dora:bfloat16:compiled:nofp32out tiny-llama:dora:bfloat16:compiled:nosiblings \
        tiny-llama:dora:bfloat16:compiled:probed tiny-llama:dora:float32:compiled \
        llama-3.2-3b:dora:bfloat16:compiled \
        llama-3.2-3b:dora:bfloat16:compiled:nofp32out
    ;;
76)
    # issue 19 (about 7 minutes, any GPU): compiled DoRA after the fix found on 2026-12-07 (torch 2.11 gives zero
    # gradients to an autograd.Function whose output is one of its intermediates' tensor objects; slimtune.core.tracing)
    # — the compile tests under the machine's torch, whether the compiled steps train (tiny and 3B), then compiled DoRA
    # against PEFT-bf16 in turns of 3 steps (its earlier ratios were withdrawn: those steps did not train)
    step function_output_alias 60 python benchmarks/function_output_alias.py
    step compile_tests 80 python -m pytest -q -x tests/core/test_compile.py
    step compiled_training_check_fixed 120 python benchmarks/compiled_training_check.py --steps 3 --cases \
        tiny-llama:dora:bfloat16:compiled tiny-llama:dora:float32:compiled llama-3.2-3b:dora:bfloat16:compiled \
        llama-3.2-3b:lora:bfloat16:compiled
    step paired_512_compile_turns3_dora_fixed 200 python benchmarks/paired_steps.py --compile --rounds 5 \
        --steps-per-turn 3 --configs dora peft-bf16:dora --out-name paired_512_compile_turns3_dora_fixed
    ;;
77)
    # issue 19 on an H200 (about 8 minutes; the card where it starts): LoRA and DoRA compiled (DoRA trains since the
    # fix of 2026-12-07) against PEFT-bf16 in turns of 3 steps; then compiled DoRA's step profiled kernel by
    # kernel against PEFT-bf16's (run 148: 4582 against 4154 kernels a step) for the per-layer list
    step paired_512_compile_turns3_h200_fixed 300 python benchmarks/paired_steps.py --compile --rounds 8 \
        --steps-per-turn 3 --configs lora dora peft-bf16:lora peft-bf16:dora \
        --out-name paired_512_compile_turns3_h200_fixed
    step profile_compiled_dora_kernels 170 python benchmarks/unet_step_profile.py --preset llama-3.2-3b --rank 32 \
        --batch 4 --compile --steps 3 --top 60 --configs dora peft-bf16:dora
    ;;
78)
    # issue 19 (about 9 minutes, carry .before = 7d18ac1, the code before; any GPU): compiled DoRA chains on stacked
    # rows (slimtune.methods.dora.stacked: LoRA's stacked GEMMs and one S Aᵀ for every member's norm; a layer's
    # GEMMs 35 + 35 → 15 + 24 in Inductor's CPU code) — the Function's CUDA tests, whether the compiled 3B step trains,
    # then compiled DoRA against the code before and PEFT-bf16 in turns of 3 steps (run 149: 1.156x PEFT-bf16)
    step stacked_dora_cuda_tests 90 python -m pytest -q tests/methods/dora/test_stacked.py -k cuda
    step compiled_training_check_stacked 130 python benchmarks/compiled_training_check.py --steps 3 --cases \
        llama-3.2-3b:dora:bfloat16:compiled
    step paired_512_compile_turns3_dora_stacked 330 python benchmarks/paired_steps.py --compile --rounds 8 \
        --steps-per-turn 3 --before .before --configs dora before:dora peft-bf16:dora \
        --out-name paired_512_compile_turns3_dora_stacked
    ;;
79)
    # issue 19 on an H200 only (about 5 minutes; exits at once on another card): compiled LoRA and DoRA against
    # PEFT-bf16 compiled in 16 rounds each (on an H100, runs 153-154: 0.885x and 0.85-0.88x), then eager HRA against
    # PEFT-bf16 (PEFT's HRA does not fit beside it on an H100, run 155)
    nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 || { echo "not an H200: nothing run"; exit 0; }
    compiled_rounds_16
    step paired_512_eager_hra 90 python benchmarks/paired_steps.py --rounds 8 --steps-per-turn 3 \
        --configs hra peft-bf16:hra --out-name paired_512_eager_hra
    ;;
80)
    # issue 19 (about 9 minutes, any GPU): on an H200, compiled LoRA and DoRA against PEFT-bf16 compiled in 16 rounds
    # each (part 79 without its HRA: PEFT's HRA runs out of an H200's memory too, the shared side-by-side of
    # 2026-12-04); on any card, compiled LoRA's step profiled beside PEFT-bf16's (wall, host, GPU kernels), to tell
    # whether it is host- or GPU-bound there
    if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
        compiled_rounds_16
    else
        echo "not an H200: the profile only"
    fi
    step profile_compiled_lora 120 python benchmarks/unet_step_profile.py --preset llama-3.2-3b --rank 32 \
        --batch 4 --compile --steps 3 --top 12 --configs lora peft-bf16:lora
    ;;
81)
    # issue 19 (about 5 minutes, any GPU): the host's share of compiled steps on the GPU machine — the 3B model's 28
    # decoder layers at tiny-llama's widths, batch 1 x 16 tokens, so that no kernel bounds the step and each step
    # times the host's work (what decides a host-bound step, as run 145's H200 host made it); LoRA and DoRA
    # against PEFT-bf16, compiled, and LoRA eager
    for m in lora dora; do
        step "host_28_compile_$m" 200 python benchmarks/paired_steps.py --compile --preset tiny-llama --layers 28 \
            --seq 16 --batch 1 --rounds 16 --steps-per-turn 3 --configs $m peft-bf16:$m --out-name "host_28_compile_$m"
    done
    step host_28_eager_lora 90 python benchmarks/paired_steps.py --preset tiny-llama --layers 28 --seq 16 --batch 1 \
        --rounds 16 --steps-per-turn 3 --configs lora peft-bf16:lora --out-name host_28_eager_lora
    ;;
82)
    # issue 19 on an H200 only (about 4 minutes; exits at once on another card): part 80's paired rounds without its
    # profile, for a session with little device time left
    nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 || { echo "not an H200: nothing run"; exit 0; }
    compiled_rounds_16
    ;;
83)
    # issue 19 (about 5 minutes, carry .before = the code before block-diagonal B's, git archive f5a22ba slimtune; on an
    # H200 part 82 instead):
    # a stacked chain's products and g from one GEMM against its B's block diagonal (4 GEMM launches fewer a LoRA
    # layer, 6 a DoRA layer, in Inductor's CPU code) — the CUDA tests, then the host proxy (part 81) against the
    # code before and PEFT-bf16
    if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
        bash "$0" 82
        exit 0
    fi
    step block_factor_cuda_tests 90 python -m pytest -q tests/core/test_stacked_rows.py tests/core/test_wide_rows.py \
        tests/methods/dora/test_stacked.py -k cuda
    for m in lora dora; do
        step "host_28_compile_block_$m" 120 python benchmarks/paired_steps.py --compile --preset tiny-llama \
            --layers 28 --seq 16 --batch 1 --rounds 12 --steps-per-turn 3 --before .before \
            --configs $m before:$m peft-bf16:$m --out-name "host_28_compile_block_$m"
    done
    ;;
84)
    # issue 19 (about 8 minutes, any GPU; carry .before = the code before block-diagonal B's: git archive f5a22ba
    # slimtune): the 3B compiled step with each chain's products and g from one GEMM against its B's block
    # diagonal, against the code before and PEFT-bf16, LoRA and DoRA in 16 rounds each (run 166 measured only the
    # host proxy)
    for m in lora dora; do
        step "paired_512_compile_block_$m" 250 python benchmarks/paired_steps.py --compile --rounds 16 \
            --steps-per-turn 3 --before .before --configs $m before:$m peft-bf16:$m \
            --out-name "paired_512_compile_block_$m"
    done
    ;;
85)
    # issue 19 (about 6 minutes, any GPU): compiled DoRA at seq 2048, the one bound over 0.9x on an H100 (run 156:
    # 0.915x PEFT-bf16 compiled, GPU-bound) — Inductor's output code of one decoder layer on each side (which kernel
    # of run 157's profile does what), then the paired rounds again with the block-diagonal B's
    for m in dora peft-bf16:dora; do
        step "output_code_2048_${m/:/_}" 150 python benchmarks/output_code.py --preset llama-3.2-3b --layers 2 \
            --method $m --seq 2048 --batch 4 --out "$out/output_code_2048_${m/:/_}.txt"
    done
    step paired_2048_compile_dora 300 python benchmarks/paired_steps.py --compile --seq 2048 --rounds 10 \
        --steps-per-turn 3 --configs dora peft-bf16:dora --out-name paired_2048_compile_dora
    ;;
86)
    # issue 19 (about 5 minutes, any GPU; carry .before = the code before, git archive b10b8fe slimtune): DoRA's
    # stacked chain of one (o, down) takes g and dB from dy against g-scaled B, so that dz is read by [dz, g] S only
    # (run 167's output code: dz written to a buffer of its own, then copied into [dz, g]) — the CUDA tests, then
    # compiled DoRA against the code before at seq 2048 (run 167: 0.907x PEFT-bf16) and at seq 512
    step stacked_dora_one_cuda_tests 90 python -m pytest -q tests/methods/dora/test_stacked.py \
        tests/core/test_stacked_rows.py -k cuda
    step paired_2048_compile_dora_one 200 python benchmarks/paired_steps.py --compile --seq 2048 --rounds 8 \
        --steps-per-turn 3 --before .before --configs dora before:dora --out-name paired_2048_compile_dora_one
    step paired_512_compile_dora_one 200 python benchmarks/paired_steps.py --compile --rounds 12 --steps-per-turn 3 \
        --before .before --configs dora before:dora peft-bf16:dora --out-name paired_512_compile_dora_one
    ;;
88)
    # issue 19's closing check on the code as it is (about 6 minutes, any GPU; on an H200 this is part 82): compiled
    # LoRA and DoRA against PEFT-bf16 compiled at seq 512, 16 rounds in turns of 3
    compiled_rounds_16
    ;;
89)
    # issue 19's closing check, the rest (about 8 minutes, any GPU; one method pair per process so that an 80 GB card
    # holds the models): eager LoRA / DoRA and LoHa / LoKr against PEFT-bf16 at seq 512, then the 8192x8192 r=384
    # layer against its GEMM floor
    step paired_512_eager_lora_dora 200 python benchmarks/paired_steps.py --rounds 8 --steps-per-turn 3 \
        --configs lora dora peft-bf16:lora peft-bf16:dora --out-name paired_512_eager_lora_dora
    step paired_512_eager_loha_lokr 170 python benchmarks/paired_steps.py --rounds 6 --steps-per-turn 3 \
        --configs loha lokr peft-bf16:loha peft-bf16:lokr --out-name paired_512_eager_loha_lokr
    step layer_compare 200 python benchmarks/layer_compare.py
    ;;
90)
    # issue 19 (about 8 minutes, any GPU; one method per process so that an 80 GB card holds both models): seq 2048
    # with torch.compile on both sides for LoRA, LoHa and LoKr against PEFT-bf16 (DoRA: run 172, 0.894x)
    step paired_2048_compile_lora 180 python benchmarks/paired_steps.py --compile --seq 2048 --rounds 6 --warmup 2 \
        --steps-per-turn 3 --configs lora peft-bf16:lora --out-name paired_2048_compile_lora
    for m in loha lokr; do
        step "paired_2048_compile_$m" 150 python benchmarks/paired_steps.py --compile --seq 2048 --rounds 4 \
            --warmup 2 --steps-per-turn 3 --configs $m peft-bf16:$m --out-name "paired_2048_compile_$m"
    done
    ;;
91)
    # issue 19 (about 5 minutes, any GPU): compiled LoRA at seq 2048 is 0.906x PEFT-bf16 (run 179; the bound 0.9x):
    # its step's kernels against PEFT-bf16's and against the floor (the adapters out, one trained scalar), to find
    # the 2-3 ms a step that the bound needs; then the paired rounds again, with the floor beside them
    step profile_2048_compile_lora 240 python benchmarks/unet_step_profile.py --preset llama-3.2-3b --rank 32 \
        --batch 4 --seq 2048 --compile --steps 3 --top 60 --configs lora peft-bf16:lora floor:lora
    step paired_2048_compile_lora_floor 200 python benchmarks/paired_steps.py --compile --seq 2048 --rounds 6 \
        --warmup 2 --steps-per-turn 3 --configs lora peft-bf16:lora floor:lora --out-name paired_2048_compile_lora_floor
    ;;
92)
    # issue 19 (about 7 minutes, any GPU): compiled LoRA at seq 2048 (0.906x PEFT-bf16, run 179) — the stacked
    # layer's large GEMMs (widths d + r: 3104, 5216) against the same products aligned or apart, then the paired
    # rounds with o and down stacked wide (wideone:lora) and o alone wide (wideo:lora) beside PEFT-bf16 (ran as
    # RESULTS.md run 180; paired_steps.py has these configurations up to commit 72345ba only)
    step stacked_gemm_shapes 60 python benchmarks/stacked_gemm_shapes.py
    step paired_2048_compile_wide 400 python benchmarks/paired_steps.py --compile --seq 2048 --rounds 5 \
        --warmup 2 --steps-per-turn 3 --configs lora wideone:lora wideo:lora peft-bf16:lora \
        --out-name paired_2048_compile_wide
    ;;
93)
    # issue 19 (about 5 minutes, any GPU; carry .before = the code before, git archive 70bfb35 slimtune, renamed
    # slimtune_before): gate/up's wide operand built as one cat when compiled (commit 4430cdf; run 181: the in-place
    # writes of s·h cost two passes over all of buf, 1.84 ms a seq-2048 step) — the wide rows' CUDA tests, then
    # compiled LoRA against the code before and PEFT-bf16 at seq 2048 and 512; then the GEMM shapes again, with the
    # rows' forward products s·h Bᵀ against other layouts and the memory floor (run 181: about 4.1 ms a step), and
    # a Triton kernel that writes base + s·h Bᵀ once (product_sum_kernel.py: an experiment outside the package)
    step wide_cuda_tests 90 python -m pytest -q tests/core/test_wide_rows.py -k cuda
    step paired_2048_compile_cat 160 python benchmarks/paired_steps.py --compile --seq 2048 --rounds 6 --warmup 2 \
        --steps-per-turn 3 --before .before --configs lora before:lora peft-bf16:lora --out-name paired_2048_compile_cat
    step paired_512_compile_cat 120 python benchmarks/paired_steps.py --compile --rounds 12 --steps-per-turn 3 \
        --before .before --configs lora before:lora peft-bf16:lora --out-name paired_512_compile_cat
    step stacked_gemm_shapes 60 python benchmarks/stacked_gemm_shapes.py
    step product_sum_kernel 60 python benchmarks/product_sum_kernel.py
    ;;
94)
    # issue 19 on the card it names (about 6 minutes; meant for an H200, runs on any card): compiled LoRA at seq 2048
    # against PEFT-bf16 (H100: 0.906-0.926x, runs 179-183; the bound 0.9x), then part 82's compiled rounds at seq 512
    nvidia-smi --query-gpu=name --format=csv,noheader
    step paired_2048_compile_lora 200 python benchmarks/paired_steps.py --compile --seq 2048 --rounds 6 --warmup 2 \
        --steps-per-turn 3 --configs lora peft-bf16:lora --out-name paired_2048_compile_lora
    compiled_rounds_16
    ;;
95)
    # issue 19 (about 7 minutes, any GPU): compiled rows' forward products s·h Bᵀ (run 181: cuBLAS's 64x32-tile
    # kernel, 4.11 ms of a seq-2048 step, where run 183 times the same products at 2.4 ms back to back) — the Triton
    # kernel's tiles against cuBLAS, back to back and after an L2 flush; then compiled LoRA with the products from
    # Triton (tritonproduct:lora, a triton_op in the graph) beside LoRA and PEFT-bf16 at seq 2048; then the three
    # profiled, with where each one's GPU idles (run 181: about 13 ms of every wall step ran no kernel)
    step product_sum_kernel 90 python benchmarks/product_sum_kernel.py
    step paired_2048_compile_tritonproduct 260 python benchmarks/paired_steps.py --compile --seq 2048 --rounds 6 \
        --warmup 2 --steps-per-turn 3 --configs lora tritonproduct:lora peft-bf16:lora \
        --out-name paired_2048_compile_tritonproduct
    step profile_2048_compile_gaps 220 python benchmarks/unet_step_profile.py --preset llama-3.2-3b --rank 32 \
        --batch 4 --seq 2048 --compile --steps 3 --top 30 --configs lora tritonproduct:lora peft-bf16:lora
    ;;
96)
    # issue 19 (about 3 minutes, any GPU): part 95 without its profile, for a session with little device time left
    step product_sum_kernel 90 python benchmarks/product_sum_kernel.py
    step paired_2048_compile_tritonproduct 200 python benchmarks/paired_steps.py --compile --seq 2048 --rounds 5 \
        --warmup 2 --steps-per-turn 3 --configs lora tritonproduct:lora peft-bf16:lora \
        --out-name paired_2048_compile_tritonproduct
    ;;
97)
    # issue 19 (about 6 minutes, any GPU): part 96 with q/k/v stacked wide too (wideqkv:lora: compiled layers' chains
    # of three on wide rows, never measured; wide_rows.py estimates a wash) in the same rounds
    step product_sum_kernel 90 python benchmarks/product_sum_kernel.py
    step paired_2048_compile_tritonproduct_wideqkv 300 python benchmarks/paired_steps.py --compile --seq 2048 \
        --rounds 5 --warmup 2 --steps-per-turn 3 --configs lora tritonproduct:lora wideqkv:lora peft-bf16:lora \
        --out-name paired_2048_compile_tritonproduct_wideqkv
    ;;
98)
    # issue 19 (about 4 minutes, any GPU): part 97's paired rounds alone, four of them, for little device time left
    step paired_2048_compile_tritonproduct_wideqkv 250 python benchmarks/paired_steps.py --compile --seq 2048 \
        --rounds 4 --warmup 2 --steps-per-turn 3 --configs lora tritonproduct:lora wideqkv:lora peft-bf16:lora \
        --out-name paired_2048_compile_tritonproduct_wideqkv
    ;;
*)
    echo "unknown part $part (1 to 98)" >&2
    exit 2
    ;;
esac
