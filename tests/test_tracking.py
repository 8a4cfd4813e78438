"""--report-to: HF Trainer's tracker names and default, and every tracker's own output read back with
its own reader: TensorBoard's event accumulator, wandb's offline run files (the .wandb record log,
parsed with wandb's protobuf), trackio's local SQLite store, MLflow's file store. A resumed run
continues the same tracked run (same TensorBoard log dir, wandb id, trackio run, MLflow run).
`train-rm` and `iterate` report too; a tracker that is not installed is one sentence naming the extra.
"""

import json
import sqlite3
import struct
from pathlib import Path

import pytest
from training_runs import config, metrics, write_data

from rrhf_fast import cli
from rrhf_fast.config import TrainConfig
from rrhf_fast.errors import UserError
from rrhf_fast.models.tiny import save_tiny_model
from rrhf_fast.reporting import tracking
from rrhf_fast.training.train import train

TORCH_THREADS = 1
ALL = ("tensorboard", "wandb", "trackio", "mlflow")
USER_SETTINGS = (
    "TENSORBOARD_LOGGING_DIR",
    "WANDB_DIR",
    "WANDB_PROJECT",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_RUN_ID",
    "MLFLOW_ALLOW_FILE_STORE",
    "TRACKIO_SPACE_ID",
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    return save_tiny_model(root / "model"), write_data(root / "data.jsonl", n=6)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Every tracker offline, writing under tmp_path; no user setting leaks in."""
    for name in USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    return tmp_path


# -------------------------------------------------------------------------------------------------
# the readers: each tracker's files, as its own tools read them


def tensorboard_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def wandb_records(path: Path):
    """The records of a .wandb file: wandb's LevelDB-style log (7-byte file header; 32 KiB blocks of
    chunks with a 7-byte header: crc, length, type full/first/middle/last), each a protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, chunks = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += block - pos % block
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        chunks = chunk if kind in (1, 2) else chunks + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            yield record


def wandb_run(run_dir: Path) -> tuple[set[str], dict[int, dict[str, float]], dict]:
    """The run ids, the history rows by train/global_step, and the config of every offline run file."""
    ids, history, config = set(), {}, {}
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                history[int(row["train/global_step"])] = row
    return ids, history, config


def trackio_rows(root: Path, project: str = "huggingface") -> tuple[set[str], dict[int, dict[str, float]]]:
    db = sqlite3.connect(root / f"{project}.db")
    rows = db.execute("SELECT run_id, step, metrics FROM metrics").fetchall()
    merged: dict[int, dict[str, float]] = {}
    for _, step, values in rows:
        merged.setdefault(step, {}).update(json.loads(values))
    return {r[0] for r in rows}, merged


def mlflow_runs(store: Path) -> dict[str, dict]:
    """run id -> its metrics ({name: {step: value}}), params and status, read off the file store."""
    runs = {}
    for meta in store.glob("*/*/meta.yaml"):
        run = meta.parent
        series = {}
        for file in (run / "metrics").rglob("*"):
            if file.is_file():
                name = str(file.relative_to(run / "metrics"))
                lines = [line.split() for line in file.read_text().splitlines()]
                series[name] = {int(step): float(value) for _, value, step in lines}
        params = {p.name: p.read_text() for p in (run / "params").iterdir()}
        status = next(line.split()[1] for line in meta.read_text().splitlines() if line.startswith("status:"))
        runs[run.name] = {"metrics": series, "params": params, "status": status,
                          "artifacts": sorted(p.name for p in (run / "artifacts").iterdir())}  # fmt: skip
    return runs


# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "asked, expected",
    [
        pytest.param((), [], id="default-none"),
        pytest.param(("none",), [], id="none"),
        pytest.param(("tensorboard", "mlflow"), ["tensorboard", "mlflow"], id="two"),
        pytest.param(("wandb,trackio",), ["wandb", "trackio"], id="comma"),
        pytest.param(("wandb", "wandb"), ["wandb"], id="repeated"),
        pytest.param(("all",), list(ALL), id="all-installed"),
    ],
)
def test_report_to_follows_the_trainers_names(asked, expected):
    assert tracking.report_to(asked) == expected


def test_names_default_and_metric_names_are_the_trainers():
    """transformers' own: its report_to default, its integration names, its rewrite_logs."""
    from transformers import TrainingArguments
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK, rewrite_logs

    assert TrainingArguments.__dataclass_fields__["report_to"].default == "none"
    assert TrainConfig.__dataclass_fields__["report_to"].default == () and tracking.report_to(()) == []
    assert set(tracking.TRACKERS) <= set(INTEGRATION_TO_CALLBACK)
    row = {"step": 5, "loss": 1.5, "lr": 1e-5, "eval_loss": 2.0, "eval_accuracy": 0.75}
    assert tracking.rewrite(row) == rewrite_logs({k: v for k, v in row.items() if k != "step"})


def test_rows_get_the_trainers_names():
    row = {"step": 3, "loss": 1.5, "eval_loss": 2.0, "skipped": False, "accuracy": None, "note": "x"}
    assert tracking.rewrite(row) == {"train/loss": 1.5, "eval/loss": 2.0, "train/skipped": 0.0}


def test_the_flag_takes_several_names_and_repeats(files, tmp_path):
    model, data = files
    argv = ["train", "--model", str(model), "--data", str(data), "--output-dir", str(tmp_path)]
    parser, _ = cli.build_parser(argv)
    args = parser.parse_args([*argv, "--report-to", "tensorboard", "wandb", "--report-to", "mlflow"])
    assert TrainConfig.from_args(args).report_to == ("tensorboard", "wandb", "mlflow")
    assert TrainConfig.from_args(parser.parse_args(argv)).report_to == ()


def test_an_unknown_or_missing_tracker_is_one_sentence_before_anything(files, tmp_path, monkeypatch):
    model, data = files
    with pytest.raises(UserError, match="--report-to comet is not a tracker; give none, all, tensorboard"):
        train(config(tmp_path, model, data, report_to=("comet",)))
    monkeypatch.setattr(tracking, "installed", lambda name: name != "wandb")
    with pytest.raises(UserError) as err:
        train(config(tmp_path, model, data, report_to=("tensorboard", "wandb")))
    assert str(err.value) == (
        "--report-to wandb needs the wandb package; install it with pip install 'rrhf-fast[tracking]'"
    )
    assert not (tmp_path / "run").exists()  # refused before the output directory was made
    with pytest.raises(UserError, match="none excludes"):
        tracking.report_to(("none", "mlflow"))


def test_every_tracker_reads_back_the_run_and_a_resume_continues_it(files, offline):
    """Two steps with eval, then --resume to four steps: one tracked run per tracker holds steps 1-4."""
    model, data = files
    project = f"test-{offline.name}"  # its own trackio database, whichever TRACKIO_DIR trackio read first
    kw = dict(
        eval_data=str(data), eval_every=2, save_every=2, report_to=ALL, run_name="sorting", project=project
    )
    train(config(offline, model, data, max_steps=2, **kw))
    run = offline / "run"
    train(config(offline, model, data, max_steps=4, resume=True, **kw))
    rows = {r["step"]: r for r in metrics(run)}
    losses = {s: rows[s]["loss"] for s in (1, 2, 3, 4)}
    evals = {s: rows[s]["eval_loss"] for s in (0, 2, 4)}

    (log_dir,) = (run / "runs").iterdir()  # the resumed run wrote into the same log dir
    scalars = tensorboard_scalars(log_dir)
    assert scalars["train/loss"] == pytest.approx(losses)
    assert scalars["eval/loss"] == pytest.approx(evals)
    assert {"train/lr", "train/accuracy", "eval/accuracy"} <= set(scalars)

    ids, history, wandb_config = wandb_run(run)
    assert len(ids) == 1  # the resumed run continued the same wandb run id
    assert {s: h["train/loss"] for s, h in history.items() if "train/loss" in h} == pytest.approx(losses)
    assert history[0]["eval/loss"] == pytest.approx(evals[0])
    assert wandb_config["micro_batch_tokens"] == 4096 and "packing" in wandb_config["run"]

    from trackio.utils import TRACKIO_DIR  # read once, when trackio is first imported

    ids, steps = trackio_rows(TRACKIO_DIR, project)
    assert len(ids) == 1
    assert {s: steps[s]["train/loss"] for s in losses} == pytest.approx(losses)
    assert {s: steps[s]["eval/loss"] for s in evals} == pytest.approx(evals)

    (only,) = mlflow_runs(run / "mlruns").values()
    assert only["metrics"]["train/loss"] == pytest.approx(losses)
    assert only["metrics"]["eval/loss"] == pytest.approx(evals)
    from mlflow.entities import RunStatus

    assert only["params"]["lr"] == "0.01" and int(only["status"]) == RunStatus.from_string("FINISHED")
    assert {"config.json", "run.json", "packing.json", "plan.json"} <= set(only["artifacts"])
    packing = json.loads((next((run / "mlruns").glob("*/*/artifacts/packing.json"))).read_text())
    assert packing == json.loads((run / "run.json").read_text())["packing"]


def test_a_tracker_that_cannot_start_is_one_sentence(files, offline, monkeypatch):
    """wandb online without a login (no network here): the hint names WANDB_MODE=offline."""
    model, data = files
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "")
    monkeypatch.setenv("HOME", str(offline))  # no ~/.netrc login
    wandb = pytest.importorskip("wandb")
    wandb.teardown()  # wandb keeps its settings (an earlier test's offline mode) per process
    with pytest.raises(UserError) as err:
        train(config(offline, model, data, max_steps=1, report_to=("tensorboard", "wandb")))
    assert str(err.value).startswith("--report-to wandb: cannot start the tracked run (")
    assert str(err.value).endswith(
        "; log in with `wandb login`, or set WANDB_MODE=offline to keep the run on disk"
    )
    wandb.teardown()


def test_only_rank_zero_opens_a_tracker(files, offline):
    from rrhf_fast.parallel.distributed import Dist
    from rrhf_fast.training.train import _open_reporter

    class Job:
        dist = Dist(rank=1, world=2)

    assert _open_reporter(Job(), None, 0, {}, {}) is None


def test_train_rm_reports_to_tensorboard(offline):
    from test_train_rm import synthetic

    from rrhf_fast.data.records import write_examples

    model = save_tiny_model(offline / "lm")
    write_examples(offline / "rm.jsonl", synthetic(8, 0))
    argv = ["train-rm", "--model", str(model), "--data", str(offline / "rm.jsonl"), "--output-dir",
            str(offline / "rm"), "--device", "cpu", "--optim", "adamw", "--max-steps", "2", "--no-plot",
            "--log-every", "0", "--report-to", "tensorboard"]  # fmt: skip
    assert cli.main(argv) == 0
    (log_dir,) = (offline / "rm" / "runs").iterdir()
    scalars = tensorboard_scalars(log_dir)
    expected = {r["step"]: r["rm_loss"] for r in metrics(offline / "rm")}
    assert scalars["train/rm_loss"] == pytest.approx(expected)


def test_iterate_reports_each_round_as_its_own_run(offline):
    from test_iterate import SCORER

    from rrhf_fast.models.tiny import save_tiny_model as tiny

    (offline / "prompts.txt").write_text("sort 312:\nsort 97:\n")
    out = offline / "online"
    argv = ["iterate", "--model", str(tiny(offline / "m")), "--prompts", str(offline / "prompts.txt"),
            "--scorer", SCORER, "--output-dir", str(out), "--rounds", "1", "--num-candidates", "2",
            "--sample-strategy", "sample", "--sample-max-new-tokens", "3", "--max-steps", "1",
            "--optim", "adamw", "--device", "cpu", "--no-plot", "--report-to", "tensorboard",
            "mlflow"]  # fmt: skip
    assert cli.main(argv) == 0
    train_dir = out / "round-001" / "train"
    (log_dir,) = (train_dir / "runs").iterdir()
    assert tensorboard_scalars(log_dir)["train/loss"] == pytest.approx({1: metrics(train_dir)[0]["loss"]})
    (run,) = mlflow_runs(train_dir / "mlruns").values()
    assert run["metrics"]["train/loss"] == pytest.approx({1: metrics(train_dir)[0]["loss"]})
    tags = next((train_dir / "mlruns").glob("*/*/tags/mlflow.runName")).read_text()
    assert tags == "online-round-001"
