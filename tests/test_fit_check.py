"""train's fit check on a pretended GPU: the plan runs before any weights load, a step that cannot
fit stops with one sentence naming the planned peak and the flags that fit, --no-fit-check skips."""

import dataclasses

import pytest
import torch
from training_runs import config, write_data

from rrhf_fast import cli
from rrhf_fast.models.tiny import save_tiny_model
from rrhf_fast.planning import fit_check, plan
from rrhf_fast.planning.simulate import batch_shape, plan_step
from rrhf_fast.training import train

GiB = 1 << 30


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def pretend_gpu(monkeypatch, free_bytes):
    monkeypatch.setattr(fit_check, "free_memory", lambda device: free_bytes)


def free_for(usable_bytes):
    """The free memory whose usable part (plan's margin) is `usable_bytes`."""
    return int((usable_bytes + plan.MARGIN_FIXED) / plan.MARGIN_FRACTION) + 1


def no_weights(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded before the fit check")

    monkeypatch.setattr(train, "build_model", refuse)


def test_a_step_that_cannot_fit_stops_before_the_weights_load(tmp_path, model_dir, monkeypatch, capsys):
    """The run's budget (2048 tokens) is over the pretended GPU by a little: the sentence gives the
    planned peak and the largest --micro-batch-tokens that fits, whose planned peak fits."""
    cfg = config(tmp_path, model_dir, write_data(tmp_path / "d.jsonl"), micro_batch_tokens=2048)
    hf = plan.read_config(str(model_dir))
    peak = plan_step(hf, cfg, batch_shape(2048)).peak_bytes
    pretend_gpu(monkeypatch, free_for(int(0.8 * peak)))
    no_weights(monkeypatch)
    argv = ["train", "--model", str(model_dir), "--data", str(tmp_path / "d.jsonl"), "--output-dir",
            str(tmp_path / "run"), "--micro-batch-tokens", "2048", "--optim", "adamw",
            "--device", "cpu"]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--no-fit-check" in err
    assert f"planned peak of this run's step is {peak / GiB:.1f} GiB" in err
    tokens = int(err.split("it fits with --micro-batch-tokens ")[1].split()[0])
    assert 256 <= tokens < 2048 and tokens % 256 == 0
    smaller = plan_step(hf, dataclasses.replace(cfg, micro_batch_tokens=tokens), batch_shape(tokens))
    assert smaller.peak_bytes <= plan.usable(free_for(int(0.8 * peak)))


@pytest.mark.slow  # 16 s: a dozen planned steps
def test_memory_flags_are_suggested_when_no_budget_fits(tmp_path, model_dir, monkeypatch):
    """Weights, gradients and states alone are over the memory at any budget: the check adds the
    memory flags until the plan fits, and says which."""
    cfg = config(tmp_path, model_dir, write_data(tmp_path / "d.jsonl"), micro_batch_tokens=256)
    hf = plan.read_config(str(model_dir))
    plain = plan_step(hf, cfg, batch_shape(256)).peak_bytes
    flags = dict(gradient_checkpointing=True, optim_in_backward=True)
    saving = plan_step(hf, dataclasses.replace(cfg, **flags), batch_shape(256)).peak_bytes
    assert saving < plain
    pretend_gpu(monkeypatch, free_for(saving))
    fix = "it fits with --gradient-checkpointing --optim-in-backward"
    with pytest.raises(fit_check.UserError, match=fix):
        fit_check.check_fit(cfg, torch.device("cpu"), longest=40, log=print)
    pretend_gpu(monkeypatch, free_for(plain))
    assert fit_check.check_fit(cfg, torch.device("cpu"), longest=40, log=print).fits


def test_no_fit_check_and_cpu_skip_it(tmp_path, model_dir, monkeypatch):
    cfg = config(tmp_path, model_dir, write_data(tmp_path / "d.jsonl"))
    assert fit_check.check_fit(cfg, torch.device("cpu"), longest=40, log=print) is None  # no GPU: no check
    pretend_gpu(monkeypatch, 1 << 20)
    skipped = dataclasses.replace(cfg, fit_check=False)
    assert fit_check.check_fit(skipped, torch.device("cpu"), longest=40, log=print) is None


def test_a_fitting_run_trains_and_says_so(tmp_path, model_dir, monkeypatch, capsys):
    pretend_gpu(monkeypatch, 80 * GiB)
    cfg = config(tmp_path, model_dir, write_data(tmp_path / "d.jsonl"), max_steps=1, micro_batch_tokens=256)
    assert train.train(cfg).step == 1
    assert "fit check: planned peak" in capsys.readouterr().out


def test_offloaded_run_over_the_host_memory_stops(tmp_path, model_dir, monkeypatch):
    """--offload-optimizer: the GPU fits, the host's planned masters, gradients and states do not."""
    cfg = config(tmp_path, model_dir, write_data(tmp_path / "d.jsonl"), micro_batch_tokens=256,
                 offload_optimizer=True)  # fmt: skip
    pretend_gpu(monkeypatch, 80 * GiB)
    monkeypatch.setattr(fit_check, "host_memory", lambda: 1 << 20)
    with pytest.raises(fit_check.UserError, match="planned host memory of this run is"):
        fit_check.check_fit(cfg, torch.device("cpu"), longest=40, log=print)
    monkeypatch.setattr(fit_check, "host_memory", lambda: 64 * GiB)
    assert (
        fit_check.check_fit(cfg, torch.device("cpu"), longest=40, log=print).report.host_peak_bytes > 1 << 20
    )
