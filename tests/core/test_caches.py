"""Caches keyed safely: bounded per-shape caches, and tensor stamps that never alias a new tensor."""
from __future__ import annotations

import torch
from torch import nn

import slimtune
from slimtune.core.caches import BoundedCache, TensorStamp


def test_bounded_cache_keeps_at_most_size_entries_and_makes_each_once():
    cache: BoundedCache[int] = BoundedCache(size=3)
    made = []
    for key in [1, 2, 1, 3, 4, 5, 5]:
        cache.get(key, lambda k=key: made.append(k) or k * 10)
    assert len(cache) == 3
    assert made == [1, 2, 3, 4, 5]
    assert cache.get(5, lambda: -1) == 50


def test_stamp_matches_until_the_tensor_changes_or_is_replaced():
    p = nn.Parameter(torch.randn(4, 3))
    stamp = TensorStamp(p)
    assert stamp.matches(p)
    with torch.no_grad():
        p.mul_(2)  # in place: the version moves
    assert not stamp.matches(p)
    stamp = TensorStamp(p)
    p.data = torch.randn(4, 3)  # a new storage under the same Parameter (no version bump)
    assert not stamp.matches(p)
    stamp = TensorStamp(p)
    assert not stamp.matches(torch.randn(4, 3)), "another tensor never matches"
    assert not stamp.matches(p.view(3, 4)), "another view of the same storage does not either"


def test_dora_norm_cache_sees_a_swapped_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    slimtune.adapt(model, slimtune.LoraConfig(r=2, target_modules=["0"], use_dora=True))
    layer = model[0]
    x = torch.randn(3, 6)
    first = layer.cached_weight_row_norm_sq().clone()
    layer.base_layer.weight.data = layer.base_layer.weight.data * 3  # no in-place write, no version bump
    assert torch.allclose(layer.cached_weight_row_norm_sq(), first * 9)
    layer(x)


def test_no_cache_in_the_package_is_keyed_on_addresses_or_ids():
    """``data_ptr()`` / ``id()`` keys can alias a new tensor or module: the adapter paths call neither as a key. One
    ``data_ptr`` comparison in LoHa's fold decides whether a view is the weight itself (a check); DoRA's pre-pass
    hands its kernel a table of addresses, read again every forward and uploaded again whenever they differ from
    the uploaded ones (addresses as the kernel's data, compared, never a key)."""
    import ast
    from pathlib import Path

    root = Path(slimtune.__file__).parent
    calls = []
    for path in sorted([*root.joinpath("core").rglob("*.py"), *root.joinpath("methods").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name in ("id", "data_ptr"):
                    calls.append((path.relative_to(root).as_posix(), name))
    assert sorted(set(calls)) == [("methods/dora/prepass.py", "data_ptr"), ("methods/loha/ops.py", "data_ptr")], calls


def test_copied_stamps_and_marks_never_match():
    """A stamp or mark that went through a copy (deepcopy, pickling) refers to no tensor: it never matches, not even
    the tensor it was taken of (a cache then recomputes; a hand-off does not happen)."""
    import copy
    import pickle

    from slimtune.core.caches import TensorMark

    t = torch.zeros(3)
    for kind in (TensorStamp, TensorMark):
        mark = kind(t)
        assert mark.matches(t)
        assert not copy.deepcopy(mark).matches(t)
        assert not pickle.loads(pickle.dumps(mark)).matches(t)
