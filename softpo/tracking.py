"""Metric sinks (main process only): `metrics.jsonl` and TensorBoard event files in the run
directory, and the experiment trackers Weights & Biases, MLflow and Trackio (`train.report_to`).

Every sink receives the same metric names at the same steps. The trackers also record the resolved
config (nested for wandb and Trackio, as dotted `section.key` params for MLflow) and name the run
after the run directory, under the project (MLflow: experiment) `train.project`. Where they store
is theirs to decide, through their own settings: `WANDB_MODE=offline` and `WANDB_DIR` for wandb,
`MLFLOW_TRACKING_URI` for MLflow (default: `mlflow.db` in the working directory), `TRACKIO_DIR`
for Trackio (default: `~/.cache/huggingface/trackio`). Each tracker is an optional extra
(`pip install 'softpo[wandb]'`); `tracker_problem` names one that is asked for but missing before
anything is built.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import sys
import time
from pathlib import Path

TRACKERS = {"wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}  # sink -> module
SINKS = ("tensorboard", "jsonl", *TRACKERS)


def tracker_problem(sinks: list[str]) -> str | None:
    """None when every tracker in `sinks` imports; else one line naming the first that does not
    and how to install it."""
    for name in sinks:
        if name in TRACKERS:
            try:
                importlib.import_module(TRACKERS[name])
            except ImportError as e:
                return (f"train.report_to asks for {name}, which is not installed ({e}); install "
                        f"it with: pip install 'softpo[{name}]'")
    return None


class MetricsWriter:
    """Writes metrics to every sink of `sinks` (main process only): see the module docstring."""

    def __init__(self, run_dir: Path, sinks: list[str], enabled: bool = True,
                 config: dict | None = None, project: str = "softpo"):
        self.enabled = enabled
        self.sinks: list = []
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        makers = {"jsonl": JsonlSink, "tensorboard": TensorBoardSink, "wandb": WandbSink,
                  "mlflow": MlflowSink, "trackio": TrackioSink}
        for name in sinks:
            self.sinks.append(makers[name](run_dir, project, config or {}))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record `metrics` at `step`."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        for sink in self.sinks:
            if clean or isinstance(sink, JsonlSink):  # the file keeps a row per call, as it did
                sink.log(step, clean)

    def close(self) -> None:
        """Flush and close the sinks (a tracker's run is marked finished)."""
        for sink in self.sinks:
            sink.close()
        self.sinks = []


class JsonlSink:
    """`metrics.jsonl`: one row per call, `{step, time, name: value...}`; non-finite numbers as
    strings."""

    def __init__(self, run_dir: Path, project: str, config: dict):
        self.file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, "time": round(time.time(), 3),
               **{k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardSink:
    """TensorBoard scalars in `run_dir/tensorboard`."""

    def __init__(self, run_dir: Path, project: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A Weights & Biases run (files under `run_dir/wandb` unless `WANDB_DIR` says otherwise)."""

    def __init__(self, run_dir: Path, project: str, config: dict):
        import os

        import wandb

        self.run = wandb.init(project=project, name=run_dir.name, config=config,
                              dir=os.environ.get("WANDB_DIR") or str(run_dir),
                              reinit="create_new")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowSink:
    """An MLflow run in the experiment `project`, at `MLFLOW_TRACKING_URI` (else MLflow's default);
    the config as dotted params."""

    BATCH = 100  # MLflow's limit on params per log_batch call

    def __init__(self, run_dir: Path, project: str, config: dict):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        experiment = self.client.get_experiment_by_name(project)
        experiment_id = experiment.experiment_id if experiment is not None else \
            self.client.create_experiment(project)
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()]
        for start in range(0, len(params), self.BATCH):
            self.client.log_batch(self.run_id, params=params[start:start + self.BATCH])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step)
                                                    for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class TrackioSink:
    """A Trackio run in the project `project` (a local SQLite store under `TRACKIO_DIR`); Trackio's
    notices go to stderr, not stdout."""

    def __init__(self, run_dir: Path, project: str, config: dict):
        import trackio

        with contextlib.redirect_stdout(sys.stderr):
            self.run = trackio.init(project=project, name=run_dir.name, config=config)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        from trackio import context_vars

        with contextlib.redirect_stdout(sys.stderr):
            self.run.finish()
        if context_vars.current_run.get() is self.run:  # else its exit hook finishes it again
            context_vars.current_run.set(None)


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """Nested dicts -> `{"section.key": value}`."""
    out: dict[str, object] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_metrics(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl (for reports and tests)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
