"""rrhf_fast.optimizers.optim: the optimizers, their parameter groups and the warmup + cosine schedule."""

import io
import sys

import pytest
import torch

from rrhf_fast.errors import UserError
from rrhf_fast.optimizers.optim import build_optimizer, default_warmup, lr_at


def test_warmup_then_cosine_to_min_lr():
    kw = dict(lr=1.0, total_steps=110, warmup_steps=10, min_lr=0.1)
    lrs = [lr_at(s, **kw) for s in range(111)]
    assert lrs[0] == pytest.approx(0.1)  # the first step learns: lr / warmup, not 0
    assert lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)  # half way through the decay: (lr + min_lr) / 2
    assert lrs[110] == pytest.approx(0.1)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:11], strict=False))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lr_at(500, **kw) == pytest.approx(0.1)  # past the end: stays at min_lr


def test_no_warmup_and_default_warmup():
    assert lr_at(0, lr=2.0, total_steps=5, warmup_steps=0) == pytest.approx(2.0)
    assert default_warmup(100) == 3 and default_warmup(10) == 1


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 80))


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "paged-adamw8bit"])
def test_weight_decay_on_matrices_only(name):
    model = _model()
    model[1].weight.requires_grad_(False)  # frozen parameters are left out
    opt = build_optimizer(model.named_parameters(), name, lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[0].bias), id(model[1].bias), id(model[2].bias)}


@pytest.mark.parametrize("name, cls", [("adamw8bit", "AdamW8bit"), ("paged-adamw8bit", "PagedAdamW8bit")])
def test_bitsandbytes_optimizers(name, cls):
    opt = build_optimizer(_model().named_parameters(), name, lr=1e-3)
    assert type(opt).__name__ == cls


def test_missing_bitsandbytes_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(UserError, match="pip install bitsandbytes.*--optim adamw"):
        build_optimizer(_model().named_parameters(), "adamw8bit", lr=1e-3)
    build_optimizer(_model().named_parameters(), "adamw", lr=1e-3)  # the fallback still works


def test_nothing_trainable_is_a_user_error():
    model = _model().requires_grad_(False)
    with pytest.raises(UserError, match="no trainable parameters"):
        build_optimizer(model.named_parameters(), "adamw", lr=1e-3)


def _step(model, opt, seed):
    torch.manual_seed(seed)
    model(torch.randn(4, 96)).square().mean().backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("name", ["adamw8bit", "adamw"])
def test_state_round_trips_through_weights_only_load_bitwise(name):
    """8-bit states (uint8 + absmax + qmap) survive torch.save / torch.load(weights_only=True)."""
    a = _model()
    opt_a = build_optimizer(a.named_parameters(), name, lr=1e-2)
    for seed in range(3):
        _step(a, opt_a, seed)
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    b = _model()
    b.load_state_dict(a.state_dict())
    opt_b = build_optimizer(b.named_parameters(), name, lr=1e-2)
    opt_b.load_state_dict(torch.load(buf, weights_only=True))
    if name == "adamw8bit":
        states = [s for st in opt_b.state.values() for s in st.values() if isinstance(s, torch.Tensor)]
        assert any(s.dtype == torch.uint8 for s in states)  # the big matrices really are 8-bit
    for seed in range(3, 6):
        _step(a, opt_a, seed)
        _step(b, opt_b, seed)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
