"""softpo/tracking.py: one tiny training run logs to metrics.jsonl, Weights & Biases (offline),
MLflow (a local SQLite store) and Trackio (a local store) at once; each tracker's own files are read
back and hold every metric of metrics.jsonl, under the same name, at the same step, with the same
value, and the resolved config. A tracker asked for but not installed stops `softpo train` with one
line before anything is built."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from softpo import cli
from softpo.tracking import flatten, read_metrics

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "softpo-tracking-test"
OVERRIDES = ["data.max_length=64", "data.max_prompt_length=32", "model.tiny.n_layer=1",
             "model.tiny.n_embd=32", "model.tiny.n_head=2", "train.max_steps=3",
             "train.batch_size=4", "train.logging_steps=1", "train.eval_steps=2",
             "train.save_steps=0", "train.progress=false", "train.eval_batch_size=32",
             "regularizer.prompts_per_step=2", "regularizer.max_new_tokens=8",
             f"train.project={PROJECT}"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The run directory of a 3-step tiny run logged to every sink (a fresh process: the trackers
    read their settings from the environment)."""
    tmp = tmp_path_factory.mktemp("tracked")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
           "TRACKIO_DIR": str(tmp / "trackio"),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "softpo.cli", "train", str(ROOT / "configs" / "tiny.yaml"),
           *OVERRIDES, f"data.train={ROOT / 'examples' / 'data' / 'prefs_tiny.jsonl'}",
           f"train.output_dir={tmp / 'run'}", "train.report_to=[jsonl,wandb,mlflow,trackio]"]
    done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Trackio" not in done.stdout  # its notices go to stderr
    return tmp


def expected(run_dir: Path) -> dict[tuple[int, str], float]:
    """(step, name) -> value of every finite number in metrics.jsonl."""
    out = {}
    for row in read_metrics(run_dir / "metrics.jsonl"):
        for k, v in row.items():
            if k not in ("step", "time") and isinstance(v, (int, float)):
                out[(row["step"], k)] = float(v)
    assert {"loss", "rewards/accuracies", "eval_pref_loss", "kl"} <= {k for _, k in out}
    return out


def resolved_config(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def wandb_records(path: Path):
    """The protobuf records of a `.wandb` file: a 7-byte header (`:W&B`, magic, version), then a
    LevelDB-style log of 32 KiB blocks, each record a 7-byte header (crc32, length, type: 1 full,
    2 first, 3 middle, 4 last) and its bytes; a block's tail shorter than a header is padding."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def test_wandb_offline_run_holds_every_metric_and_the_config(run):
    files = list((run / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    logged, config, name = {}, {}, None
    for record in wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in record.history.item}
            step = int(items["_step"])
            logged.update({(step, k): v for k, v in items.items() if not k.startswith("_")})
        elif kind == "run":
            name = record.run.display_name
            assert record.run.project == PROJECT
            config = {i.key: json.loads(i.value_json) for i in record.run.config.update}
    want = expected(run / "run")
    assert {key: logged[key] for key in want} == pytest.approx(want)
    assert name == "run"
    assert {k: config[k] for k in ("loss", "train", "model")} == \
        {k: resolved_config(run / "run")[k] for k in ("loss", "train", "model")}


def test_mlflow_run_holds_every_metric_and_the_config(run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(PROJECT)
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == "run" and found.info.status == "FINISHED"
    want = expected(run / "run")
    logged = {}
    for name in {k for _, k in want}:
        logged.update({(m.step, name): m.value for m in client.get_metric_history(found.info.run_id,
                                                                                  name)})
    assert {key: logged[key] for key in want} == pytest.approx(want)
    params = flatten(resolved_config(run / "run"))
    assert found.data.params["loss.name"] == params["loss.name"] == "spo"
    assert found.data.params["optim.lr"] == str(params["optim.lr"])
    assert found.data.params["train.report_to"] == str(params["train.report_to"])


def test_trackio_store_holds_every_metric_and_the_config(run):
    """Read back with Trackio's own API in a fresh process (it reads TRACKIO_DIR on import)."""
    code = ("import json, trackio; from trackio.sqlite_storage import SQLiteStorage; "
            f"r = trackio.Api().runs({PROJECT!r}); "
            "print(json.dumps({'names': [x.name for x in r], 'config': r[0].config, "
            f"'logs': SQLiteStorage.get_logs({PROJECT!r}, 'run')}}, default=str))")
    env = {**os.environ, "TRACKIO_DIR": str(run / "trackio")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["names"] == ["run"]
    logged = {}
    for row in got["logs"]:
        logged.update({(row["step"], k): v for k, v in row.items()
                       if k not in ("step", "timestamp") and isinstance(v, (int, float))
                       and math.isfinite(v)})
    want = expected(run / "run")
    assert {key: logged[key] for key in want} == pytest.approx(want)
    assert got["config"]["loss"] == resolved_config(run / "run")["loss"]


@pytest.mark.parametrize("tracker", ["wandb", "mlflow", "trackio"])
def test_a_missing_tracker_is_one_line_before_anything_is_built(tracker, tmp_path, monkeypatch,
                                                                capsys):
    monkeypatch.setitem(sys.modules, tracker, None)  # `import tracker` now raises ImportError
    code = cli.main(["train", str(ROOT / "configs" / "tiny.yaml"), *OVERRIDES,
                     f"data.train={ROOT / 'examples' / 'data' / 'prefs_tiny.jsonl'}",
                     f"train.output_dir={tmp_path / 'run'}", f"train.report_to=[jsonl,{tracker}]"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"train.report_to asks for {tracker}, which is not installed" in err
    assert f"pip install 'softpo[{tracker}]'" in err
    assert not (tmp_path / "run").exists()  # nothing built, nothing written
