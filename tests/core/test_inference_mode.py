"""Every method's adapted model runs under ``torch.inference_mode`` (inference tensors have no version counter: the
hand-offs between layers and the caches must not read it) and gives what ``no_grad`` gives — within rounding, as
sibling layers run alone there (fused and lone calls round differently) — and training afterwards still fuses."""
import pytest
import torch

import slimtune
from slimtune.core.siblings import ACTIVE
from tests.helpers import rel_err
from tests.toy_models import tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "lora": lambda: slimtune.LoraConfig(r=4, target_modules=TARGETS),
    "dora": lambda: slimtune.LoraConfig(r=4, target_modules=TARGETS, use_dora=True),
    "loha": lambda: slimtune.LohaConfig(r=4, target_modules=TARGETS),
    "lokr": lambda: slimtune.LokrConfig(r=4, target_modules=TARGETS),
    "hra": lambda: slimtune.HraConfig(r=4, target_modules=TARGETS),
}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_inference_mode_matches_no_grad(method):
    torch.manual_seed(0)
    model = slimtune.adapt(tiny_llama().train(), CONFIGS[method]())
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(slimtune.trainable_parameters(model), lr=0.1)
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    with torch.inference_mode():
        got = model(input_ids=ids).logits
    assert rel_err(got, want) < 1e-5
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in slimtune.trainable_parameters(model))
    groups = {id(m.siblings): m.siblings for m in model.modules() if getattr(m, "siblings", None) is not None}
    assert all(g.state is ACTIVE for g in groups.values()) or method not in ("lora", "dora")
