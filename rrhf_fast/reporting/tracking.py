"""`--report-to`: the run's config, run.json, packing summary, step plan and every metrics row, sent to
the experiment trackers users already run, under Hugging Face Trainer's names.

Names and defaults follow transformers' integrations (transformers/integrations/integration_utils.py):
`none` (transformers >= 5's default, also ours: nothing is reported unless asked), `all` (every
installed tracker of ours), `tensorboard`, `wandb`, `trackio`, `mlflow`, several allowed. Metric
names are rewritten as the Trainer's `rewrite_logs` does: `eval_loss` -> `eval/loss`, every other
key `loss` -> `train/loss`; the x-axis is the optimizer step.

Offline first, nothing needs a network:
- tensorboard: event files in `OUTPUT_DIR/runs/<date>_<host>` (the Trainer's default_logdir), or
  TENSORBOARD_LOGGING_DIR;
- wandb: whatever WANDB_MODE says (`offline` writes `OUTPUT_DIR/wandb/offline-run-*`, or WANDB_DIR);
  project WANDB_PROJECT, default "huggingface" as the Trainer's;
- trackio: its local SQLite store (TRACKIO_DIR, default ~/.cache/huggingface/trackio), project
  --project;
- mlflow: MLFLOW_TRACKING_URI, else a file store in `OUTPUT_DIR/mlruns` (MLflow 3 keeps the file
  store in maintenance mode behind MLFLOW_ALLOW_FILE_STORE, which is set for that store only);
  experiment MLFLOW_EXPERIMENT_NAME, else --project.

Resume continues the same tracked run: the checkpoint's trainer state keeps each tracker's handle
(the TensorBoard log dir, the wandb run id, the trackio run name, the MLflow run id). TensorBoard
drops the events a crashed run logged after the checkpoint (purge_step); wandb plots against
`train/global_step`, as the Trainer defines it, so replayed steps overwrite nothing. Only rank 0
reports (train.py opens no tracker elsewhere).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
from datetime import datetime
from pathlib import Path
from typing import Any

from rrhf_fast.config import REPORT_TO
from rrhf_fast.errors import UserError

TRACKERS = tuple(n for n in REPORT_TO if n not in ("none", "all"))
# The module each tracker needs (tensorboard: torch.utils.tensorboard's writer needs the package).
_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}
EXTRA = "pip install 'rrhf-fast[tracking]'"
_HINT = {
    "tensorboard": "check that the log directory (TENSORBOARD_LOGGING_DIR or OUTPUT_DIR/runs) is writable",
    "wandb": "log in with `wandb login`, or set WANDB_MODE=offline to keep the run on disk",
    "trackio": "check TRACKIO_DIR (its local store) and TRACKIO_SPACE_ID",
    "mlflow": "check MLFLOW_TRACKING_URI (unset: a file store in OUTPUT_DIR/mlruns)",
}


def report_to(names: Any) -> list[str]:
    """The trackers `--report-to` asks for: names split on commas, `none` (or nothing) -> [], `all`
    -> every installed one, in the Trainer's order; one sentence for an unknown or missing one."""
    asked = [n.strip() for name in names or () for n in str(name).split(",") if n.strip()]
    unknown = [n for n in asked if n not in REPORT_TO]
    if unknown:
        raise UserError(f"--report-to {unknown[0]} is not a tracker; give {', '.join(REPORT_TO)}")
    if asked in ([], ["none"]):
        return []
    if "none" in asked:
        raise UserError(f"--report-to none excludes other trackers; got {' '.join(asked)}")
    if "all" in asked:
        return [n for n in TRACKERS if installed(n)]
    for name in asked:
        if not installed(name):
            raise UserError(f"--report-to {name} needs the {_MODULES[name]} package; install it with {EXTRA}")
    return list(dict.fromkeys(asked))


def installed(name: str) -> bool:
    return importlib.util.find_spec(_MODULES[name]) is not None


def rewrite(row: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl row as tracker metrics: eval_x -> eval/x, x -> train/x; numbers only."""
    out = {}
    for key, value in row.items():
        if key == "step" or value is None or isinstance(value, str):
            continue
        name = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
        out[name] = float(value)
    return out


class Reporter:
    """Every tracker of one run. `state()` goes into each checkpoint; a resumed run passes it back."""

    def __init__(self, names: list[str], out_dir: Path, run_name: str, project: str,
                 saved: dict[str, Any] | None, step: int) -> None:  # fmt: skip
        saved = saved or {}
        self.trackers = []
        for name in names:
            try:
                self.trackers.append(_OPEN[name](out_dir, run_name, project, saved.get(name), step))
            except Exception as err:  # e.g. wandb online without a login: one sentence, not a traceback
                self.close(failed=True)
                first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
                raise UserError(
                    f"--report-to {name}: cannot start the tracked run ({first}); {_HINT[name]}"
                ) from None

    def log_run(self, config: dict[str, Any], run: dict[str, Any], plan: dict[str, Any]) -> None:
        """The flags, run.json (what they resolved to), its packing summary and the step plan."""
        texts = {"config": config, "run": run, "packing": run.get("packing", {}), "plan": plan}
        for tracker in self.trackers:
            tracker.log_run(config, {k: json.dumps(v, indent=1, default=str) for k, v in texts.items()})

    def log(self, row: dict[str, Any]) -> None:
        metrics = rewrite(row)
        for tracker in self.trackers:
            tracker.log(metrics, int(row["step"]))

    def state(self) -> dict[str, Any]:
        return {t.name: t.handle for t in self.trackers}

    def close(self, failed: bool = False) -> None:
        for tracker in self.trackers:
            tracker.close(failed)


def open_reporter(config: Any, out_dir: Path, saved: dict[str, Any] | None, step: int) -> Reporter | None:
    names = report_to(config.report_to)
    if not names:
        return None
    name = config.run_name or Path(out_dir).resolve().name
    return Reporter(names, out_dir, name, config.project, saved, step)


# -------------------------------------------------------------------------------------------------
# the trackers: each opens (or reopens) its run, logs the run's texts and rows, and closes it


class TensorBoard:
    name = "tensorboard"

    def __init__(self, out_dir: Path, run_name: str, project: str, saved: str | None, step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        env = os.environ.get("TENSORBOARD_LOGGING_DIR")
        default = out_dir / "runs" / f"{datetime.now():%b%d_%H-%M-%S}_{socket.gethostname()}"
        self.handle = saved or (os.path.expanduser(env) if env else str(default))
        # purge_step: events a crashed run wrote after the checkpoint are dropped, not doubled
        self.writer = SummaryWriter(log_dir=self.handle, purge_step=step + 1 if saved else None)

    def log_run(self, config: dict[str, Any], texts: dict[str, str]) -> None:
        for key, text in texts.items():
            self.writer.add_text(key, f"```\n{text}\n```")
        self.writer.flush()

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()


class Wandb:
    name = "wandb"

    def __init__(self, out_dir: Path, run_name: str, project: str, saved: str | None, step: int) -> None:
        import wandb

        self.wandb = wandb
        where = os.environ.get("WANDB_DIR") or str(out_dir)
        project = os.environ.get("WANDB_PROJECT", "huggingface")
        self.run = wandb.init(project=project, name=run_name, dir=where, id=saved,
                              resume="allow" if saved else None, reinit="create_new")  # fmt: skip
        self.handle = self.run.id
        self.run.define_metric("train/global_step")  # the Trainer's x-axis
        self.run.define_metric("*", step_metric="train/global_step", step_sync=True)

    def log_run(self, config: dict[str, Any], texts: dict[str, str]) -> None:
        self.run.config.update({**config, "run": json.loads(texts["run"]), "plan": json.loads(texts["plan"])},
                               allow_val_change=True)  # fmt: skip

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({**metrics, "train/global_step": step})

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class Trackio:
    name = "trackio"

    def __init__(self, out_dir: Path, run_name: str, project: str, saved: str | None, step: int) -> None:
        import trackio

        self.trackio = trackio
        self.handle = saved or run_name
        self.run = trackio.init(project=project, name=self.handle, resume="allow")

    def log_run(self, config: dict[str, Any], texts: dict[str, str]) -> None:
        extra = {k: texts[k] for k in ("run", "plan")}
        self.trackio.config.update({**config, **extra}, allow_val_change=True)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.trackio.log(metrics, step=step)

    def close(self, failed: bool) -> None:
        self.trackio.finish()


class MLflow:
    name = "mlflow"
    _NAME = re.compile(r"[^0-9A-Za-z_\-. :/]")  # what the Trainer's MLflowCallback replaces by "_"

    def __init__(self, out_dir: Path, run_name: str, project: str, saved: str | None, step: int) -> None:
        import mlflow

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (out_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3: the local file store
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        self.entities = mlflow.entities
        self.resumed = saved is not None
        if saved is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or project
            found = self.client.get_experiment_by_name(name)
            experiment = found.experiment_id if found else self.client.create_experiment(name)
            saved = self.client.create_run(experiment, run_name=run_name).info.run_id
        else:
            self.client.update_run(saved, status="RUNNING")
        self.handle = saved

    def log_run(self, config: dict[str, Any], texts: dict[str, str]) -> None:
        if not self.resumed:  # MLflow's params are write-once
            limit = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
            params = [self.entities.Param(k, str(v)[:limit]) for k, v in config.items()]
            for i in range(0, len(params), 100):
                self.client.log_batch(self.handle, params=params[i : i + 100])
        for key, text in texts.items():
            self.client.log_text(self.handle, text, f"{key}.json")

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(datetime.now().timestamp() * 1000)
        rows = [self.entities.Metric(self._NAME.sub("_", k), v, now, step) for k, v in metrics.items()]
        self.client.log_batch(self.handle, metrics=rows)

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.handle, status="FAILED" if failed else "FINISHED")


_OPEN = {"tensorboard": TensorBoard, "wandb": Wandb, "trackio": Trackio, "mlflow": MLflow}
