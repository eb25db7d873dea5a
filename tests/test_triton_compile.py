"""Every Triton kernel compiles for Hopper (sm_90), on this CPU machine, without a GPU.

The interpreter (the other kernel tests) runs kernels as NumPy and checks what they compute, but it accepts
programs the compiler rejects (e.g. a variable of different shapes in the two branches of an ``if``); here each
kernel goes through Triton's real pipeline down to machine code for ``cuda:90``, with the argument types the
library launches it with (bf16 data, the constexpr values of a typical call). Skipped where this Triton's offline
compile API differs (it is not a stable interface).
"""
import inspect
import os

import pytest

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("kernels are defined for the interpreter in this process", allow_module_level=True)

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # pragma: no cover - other Triton layouts
    pytest.skip("this Triton has no offline ASTSource / GPUTarget API", allow_module_level=True)


def compile_for_hopper(kernel, types: dict[str, object]) -> None:
    """Compile ``kernel`` with ``types``: a Triton type string (``"*bf16"``, ``"i32"``, ``"fp32"``) per runtime
    argument, the value itself for each ``tl.constexpr`` one."""
    names = list(inspect.signature(kernel.fn).parameters)
    assert set(names) == set(types), set(names) ^ set(types)
    constexprs = {(i,): types[n] for i, n in enumerate(names) if not isinstance(types[n], str) or
                  not (types[n].startswith("*") or types[n] in ("i32", "i64", "fp32"))}
    signature = {n: ("constexpr" if (i,) in constexprs else types[n]) for i, n in enumerate(names)}
    try:
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    except TypeError as exc:  # pragma: no cover - another Triton's ASTSource
        pytest.skip(f"ASTSource signature differs in this Triton: {exc}")
    triton.compile(source, target=GPUTarget("cuda", 90, 32))


def _loha():
    from slimtune.methods.loha import triton_kernels as L

    factors = dict(w1a_ptr="*bf16", w1b_ptr="*bf16", w2a_ptr="*bf16", w2b_ptr="*bf16", scale_ptr="*fp32",
                   scale="fp32", rank="i32", K="i32", M="i32", BM=64, BN=64, BR=32, PRECISION=None)
    return [
        (L._fold_kernel, dict(factors, w_ptr="*bf16", out_ptr="*bf16", stride_w="i32", stride_out="i32",
                              HAS_ROW_SCALE=False)),
        (L._grads_kernel, dict(factors, g_ptr="*bf16", grads_ptr="*bf16", w_ptr="*bf16", out_ptr="*bf16",
                               stride_g="i32", stride_w="i32", stride_out="i32", partial_ptr="*fp32",
                               counter_ptr="*i32", n_parts="i32", HAS_ROW_SCALE=True, FOLD=True)),
    ]


def _dora():
    from slimtune.methods.dora import triton_kernels as D, triton_norm as N

    vectors = dict(wa_ptr="*fp32", gram_ptr="*fp32", b_ptr="*bf16", wsq_ptr="*fp32", m_ptr="*bf16", rank="i32",
                   stride_wa="i32", stride_b="i32", scaling="fp32", half="fp32", eps="fp32", PRECISION="tf32x3")
    return [
        (D._compose_fwd_kernel, dict(base_ptr="*bf16", lora_ptr="*bf16", gm1_ptr="*fp32", g_ptr="*fp32",
                                     bias_ptr="*bf16", out_ptr="*bf16", stats_ptr="*fp32", n_rows="i32",
                                     n_cols="i32", rows_per_chunk="i32", stride_base="i32", stride_lora="i32",
                                     stride_out="i32", scaling="fp32", HAS_LORA=False, HAS_G=True, HAS_BIAS=False,
                                     HAS_STATS=False, BLOCK_N=16, BLOCK_D=128)),
        (D._compose_bwd_kernel, dict(dy_ptr="*bf16", base_ptr="*bf16", lora_ptr="*bf16", shift_ptr="*fp32",
                                     g_ptr="*fp32", scale_ptr="*fp32", dbase_ptr="*bf16", partial_ptr="*fp32",
                                     dysum_ptr="*fp32", n_rows="i32", n_cols="i32", rows_per_chunk="i32",
                                     stride_dy_row="i32", stride_dy_col="i32", stride_base="i32",
                                     stride_lora="i32", stride_dbase="i32", scaling="fp32", HAS_LORA=False,
                                     HAS_SHIFT=False, HAS_SCALE=True, DY_SUM=True, BLOCK_N=16, BLOCK_D=128)),
        (N._vectors_kernel, dict(vectors, out_ptr="*fp32", n_rows="i32", BLOCK_R=64, BLOCK_K=32)),
        (N._vectors_compose_kernel, dict(vectors, base_ptr="*bf16", bias_ptr="*bf16", out_ptr="*bf16",
                                         vec_ptr="*fp32", n_rows="i32", n_cols="i32", rows_per_chunk="i32",
                                         stride_base="i32", stride_out="i32", HAS_BIAS=True, BLOCK_N=16,
                                         BLOCK_D=128, BLOCK_K=64)),
    ]


def _nf4():
    from slimtune.quant import nf4_triton as Q

    return [(Q._dequant_nf4_kernel, dict(packed_ptr="*u8", absmax_ptr="*u8", nested_ptr="*fp32",
                                          nested_code_ptr="*fp32", offset_ptr="*fp32", code_ptr="*fp32",
                                          out_ptr="*bf16", numel="i32", BLOCKSIZE=64, DQ_BLOCKSIZE=256,
                                          DOUBLE_QUANT=True, BLOCK=Q.BLOCK))]


@pytest.mark.parametrize("family", [_loha, _dora, _nf4], ids=["loha", "dora", "nf4"])
def test_kernels_compile_for_hopper(family):
    for kernel, types in family():
        compile_for_hopper(kernel, types)
