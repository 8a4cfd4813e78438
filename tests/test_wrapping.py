"""rrhf_fast.models.wrapping: peft unwrapping and the eval-mode block every caller shares."""

import pytest
import torch

from rrhf_fast.models import eval_mode, unwrap


class Wrapper(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def get_base_model(self):
        return self.inner


@pytest.mark.parametrize(
    "training", [pytest.param(True, id="from-train"), pytest.param(False, id="from-eval")]
)
def test_eval_mode_restores_the_mode_even_on_error(training):
    model = torch.nn.Sequential(torch.nn.Dropout(0.5)).train(training)
    with eval_mode(model) as inside:
        assert inside is model and not model.training and not model[0].training
    assert model.training is training and model[0].training is training
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("boom")
    assert model.training is training


def test_unwrap_reaches_inside_a_peft_style_wrapper_only():
    inner = torch.nn.Linear(2, 2)
    assert unwrap(Wrapper(inner)) is inner
    assert unwrap(inner) is inner
