"""parallel.safe_dcp: an FSDP2 run's sharded optimizer state is read back without unpickling
anything (DCP's `.metadata` pickle is never opened; non-tensor values load with weights_only)."""

import json
import os
import pickle

import pytest
import torch

from rrhf_fast.errors import UserError
from rrhf_fast.parallel.distributed import load_sharded_optimizer, save_sharded_optimizer
from rrhf_fast.parallel.safe_dcp import METADATA_JSON

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP in one process


class _Payload:
    def __reduce__(self):
        return (open, (os.environ["RRHF_FAST_TEST_MARKER"], "w"))


def _trained(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    return model, opt


def _fresh(model):
    other = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    other.load_state_dict(model.state_dict())
    return other, torch.optim.AdamW(other.parameters(), lr=1.0)


@pytest.fixture
def marker(tmp_path, monkeypatch):
    path = tmp_path / "pwned"
    monkeypatch.setenv("RRHF_FAST_TEST_MARKER", str(path))
    return path


def test_round_trip_restores_the_optimizer_exactly(tmp_path):
    model, opt = _trained()
    save_sharded_optimizer(model, opt, tmp_path / "optimizer")
    other, other_opt = _fresh(model)
    load_sharded_optimizer(other, other_opt, tmp_path / "optimizer")
    assert str(other_opt.state_dict()) == str(opt.state_dict())


def test_a_crafted_metadata_pickle_never_runs(tmp_path, marker):
    model, opt = _trained()
    directory = tmp_path / "optimizer"
    save_sharded_optimizer(model, opt, directory)
    (directory / ".metadata").write_bytes(pickle.dumps(_Payload()))
    other, other_opt = _fresh(model)
    load_sharded_optimizer(other, other_opt, directory)  # the JSON metadata the run wrote is what counts
    assert not marker.exists()
    assert str(other_opt.state_dict()) == str(opt.state_dict())
    (directory / METADATA_JSON).unlink()  # a checkpoint from elsewhere: only the pickle
    with pytest.raises(UserError, match=f"no {METADATA_JSON} .*pickled .metadata could run code"):
        load_sharded_optimizer(other, other_opt, directory)
    assert not marker.exists()


def test_a_crafted_non_tensor_value_never_runs(tmp_path, marker):
    """A param_groups value DCP stores as pickled bytes, and would read with weights_only=False."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model, opt = _trained()
    state = get_optimizer_state_dict(model, opt)
    state["param_groups"][0]["lr"] = _Payload()
    import torch.distributed.checkpoint as dcp

    from rrhf_fast.parallel.safe_dcp import write_metadata

    directory = tmp_path / "optimizer"
    write_metadata(dcp.save({"optimizer": state}, checkpoint_id=directory), directory)
    other, other_opt = _fresh(model)
    with pytest.raises(UserError, match="param_groups.0.lr: a value of the sharded optimizer state cannot"):
        load_sharded_optimizer(other, other_opt, directory)
    assert not marker.exists()


@pytest.mark.parametrize(
    "edit, words",
    [(lambda m: m.update(format="pickle"), "format is not"),
     (lambda m: m["storage"][0].update(file="../../etc/passwd"), "is not a plain file name"),
     (lambda m: next(iter(m["items"].values())).update(dtype="os.system"), "unknown dtype")],
    ids=["foreign", "path-escape", "bad-dtype"],
)  # fmt: skip
def test_a_tampered_metadata_json_is_one_sentence(tmp_path, edit, words):
    model, opt = _trained()
    save_sharded_optimizer(model, opt, tmp_path / "optimizer")
    file = tmp_path / "optimizer" / METADATA_JSON
    data = json.loads(file.read_text())
    data["items"] = {k: v for k, v in data["items"].items() if "bytes" not in v} | {
        k: v for k, v in data["items"].items() if "bytes" in v
    }  # tensors first: the dtype edit hits one
    edit(data)
    file.write_text(json.dumps(data))
    with pytest.raises(UserError, match=f"not the sharded-optimizer metadata rrhf-fast writes .*{words}"):
        load_sharded_optimizer(*_fresh(model), tmp_path / "optimizer")
