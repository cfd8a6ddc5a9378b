"""A 2-process (torchrun, gloo on CPU) run equals a 1-process run with the same global batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["data.max_length=64", "data.max_prompt_length=32", "model.tiny.n_layer=1",
          "model.tiny.n_embd=32", "model.tiny.n_head=2", "train.max_steps=4", "train.logging_steps=1",
          "train.eval_steps=0", "train.save_steps=0", "train.progress=false", "optim.lr=1e-2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(launcher: list[str], out: Path, batch_size: int, loss: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*launcher, "-m", "softpo.cli", "train", str(ROOT / "configs" / "tiny.yaml"), *COMMON,
           f"loss.name={loss}", f"loss.beta={0 if loss == 'spo' else 0.1}", f"train.batch_size={batch_size}", f"train.output_dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_two_processes_equal_one(tmp_path):
    """SPO without the regulariser and DPO (reference forward): same parameters after 4 steps.
    (With the regulariser the processes draw their own samples, so runs agree in distribution.)"""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port())]
    for loss in ("spo", "dpo"):
        run(torchrun, tmp_path / f"two-{loss}", 4, loss)
        run([sys.executable], tmp_path / f"one-{loss}", 8, loss)
        one = load_file(tmp_path / f"one-{loss}" / "final" / "model.safetensors")
        two = load_file(tmp_path / f"two-{loss}" / "final" / "model.safetensors")
        for name in one:
            torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=2e-5)
        logged = [json.loads(line) for line in
                  (tmp_path / f"two-{loss}" / "metrics.jsonl").read_text().splitlines()]
        assert len([r for r in logged if "loss" in r]) == 4  # the main process alone writes metrics
