"""NF4 storage: quantise/dequantise error, bit layout, the Triton kernel vs its reference, bitsandbytes parity."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from slimtune.errors import ConfigError
from slimtune.quant.nf4 import (NF4_CODE, block_scales, dequantize_nf4_reference, dynamic_map, nf4_storage_bytes,
                                quantize_nf4)


def gaussian(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_code_tables():
    code = torch.tensor(NF4_CODE)
    assert code.numel() == 16 and code[0] == -1 and code[-1] == 1 and code[7] == 0
    assert bool((code[1:] > code[:-1]).all())
    dmap = dynamic_map()
    assert dmap.numel() == 256 and dmap.min() >= -1 and dmap.max() == 1 and bool((dmap[1:] >= dmap[:-1]).all())


def test_error_on_gaussian_weights_matches_nf4_expectation():
    """For N(0,1) weights in blocks of 64, NF4's relative MSE is ~0.0085 (expected: the code's quantisation
    noise at the block absmax ~2.4σ); double quantisation of the scales adds almost nothing."""
    w = gaussian(512, 512)
    for double_quant in (False, True):
        rel_mse = ((dequantize_nf4_reference(quantize_nf4(w, double_quant=double_quant)) - w).pow(2).mean()
                   / w.pow(2).mean()).item()
        assert 0.007 < rel_mse < 0.0095, (double_quant, rel_mse)


def test_every_value_is_a_code_times_its_block_scale():
    w = gaussian(10, 70)  # 700 elements: 11 blocks, the last one partial
    t = quantize_nf4(w, double_quant=False)
    assert t.packed.dtype == torch.uint8 and t.packed.numel() == 350 and t.absmax.numel() == 11
    torch.testing.assert_close(t.absmax, torch.nn.functional.pad(w.reshape(-1), (0, 4)).view(11, 64).abs().amax(1))
    d = dequantize_nf4_reference(t).reshape(-1)
    scales = t.absmax.repeat_interleave(64)[:700]
    codes = d / scales
    nearest = (codes[:, None] - torch.tensor(NF4_CODE)).abs().min(1).values
    assert nearest.max() < 1e-6
    # nearest code: no other code is closer to the normalised weight
    normed = w.reshape(-1) / scales
    err_ours = (normed - codes).abs()
    err_best = (normed[:, None] - torch.tensor(NF4_CODE)).abs().min(1).values
    assert (err_ours - err_best).max() < 1e-6


def test_packing_high_nibble_first_and_odd_lengths():
    w = torch.tensor([1.0, -1.0, 0.0])  # codes 15, 0, 7; padding nibble is the zero code (7)
    t = quantize_nf4(w, double_quant=False)
    assert t.packed.tolist() == [(15 << 4) | 0, (7 << 4) | 7]
    assert dequantize_nf4_reference(t).tolist() == [1.0, -1.0, 0.0]


def test_double_quantised_scales_are_close_and_storage_is_4_127_bits():
    w = gaussian(256, 256)
    single, double = quantize_nf4(w, double_quant=False), quantize_nf4(w)
    assert double.absmax.dtype == torch.uint8 and double.nested_absmax.numel() == 4
    assert ((block_scales(double) - single.absmax).abs() / single.absmax).max() < 0.02
    assert nf4_storage_bytes(4096 * 4096) * 8 / (4096 * 4096) == pytest.approx(4.127, abs=1e-3)
    assert nf4_storage_bytes(100, double_quant=False) == 50 + 4 * 2


def test_zero_blocks_and_bad_input():
    w = torch.zeros(128)
    w[64:] = gaussian(64)
    assert torch.equal(dequantize_nf4_reference(quantize_nf4(w))[:64], torch.zeros(64))
    with pytest.raises(ConfigError, match="NaN"):
        quantize_nf4(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ConfigError, match="floating"):
        quantize_nf4(torch.ones(4, dtype=torch.int32))
    with pytest.raises(ConfigError, match="power of two"):
        quantize_nf4(gaussian(64), blocksize=48)


def test_bitsandbytes_layout_and_values():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(dynamic_map(), bnbf.create_dynamic_map(signed=True))
    for shape in [(64, 256), (33, 70), (5,)]:
        w = gaussian(*shape, seed=3)
        ours = quantize_nf4(w)
        packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        assert torch.equal(ours.packed, packed.reshape(-1))  # nibbles: bit for bit
        torch.testing.assert_close(ours.nested_absmax, state.state2.absmax, rtol=0, atol=0)
        torch.testing.assert_close(ours.offset, state.offset.reshape(()), rtol=0, atol=0)
        # their tensors dequantised by our reference = their dequantisation, exactly
        theirs = type(ours)(packed=packed.reshape(-1), absmax=state.absmax, shape=torch.Size(state.shape),
                            nested_absmax=state.state2.absmax, nested_code=state.state2.code, offset=state.offset)
        assert torch.equal(dequantize_nf4_reference(theirs, code=state.code), bnbf.dequantize_4bit(packed, state))


def test_bitsandbytes_scale_codes_agree_up_to_ties():
    """bitsandbytes' CPU kernel picks the farther of two nearly equidistant 8-bit scale codes for a few
    scales; ours is always the nearest, so ours is never worse."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = gaussian(1024, 1024, seed=5)
    ours = quantize_nf4(w)
    _, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    same = (ours.absmax == state.absmax).float().mean().item()
    assert same > 0.995
    exact = w.reshape(-1, 64).abs().amax(1)
    theirs = type(ours)(packed=ours.packed, absmax=state.absmax, shape=ours.shape, nested_absmax=ours.nested_absmax,
                        nested_code=ours.nested_code, offset=ours.offset)
    assert ((block_scales(ours) - exact).abs() <= (block_scales(theirs) - exact).abs() + 1e-7).all()


_INTERPRETER_CHECK = r"""
import torch
from slimtune.quant.nf4 import quantize_nf4, dequantize_nf4_reference
from slimtune.quant.nf4_triton import dequantize_nf4_triton
for shape, dq in [((64, 256), True), ((33, 70), True), ((5,), True), ((130, 3), False), ((4, 4096), True)]:
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    t = quantize_nf4(w, double_quant=dq)
    for dtype in (torch.float32, torch.float16):
        assert torch.equal(dequantize_nf4_triton(t, dtype), dequantize_nf4_reference(t, dtype)), (shape, dq, dtype)
print("ok")
"""


def test_triton_kernel_matches_reference_in_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _INTERPRETER_CHECK], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
