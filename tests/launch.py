"""Helpers for tests that run `softpo train` in subprocesses: one process, torchrun or
`accelerate launch` with 2 processes on the CPU (gloo), and a real signal at a chosen step."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
FSDP_CONFIG = ROOT / "configs" / "accelerate" / "fsdp.yaml"
TINY = {"model.tiny.n_layer": 2, "model.tiny.n_embd": 32, "model.tiny.n_head": 2,
        "data.max_length": 64, "data.max_prompt_length": 32, "train.logging_steps": 1,
        "train.progress": False, "train.report_to": "[jsonl]", "optim.lr": 1e-2,
        "optim.warmup_steps": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(run: Path, **overrides) -> list[str]:
    """`train configs/tiny.yaml` with the tiny shapes above and `overrides` (dots as `__`)."""
    extra = {**TINY, "train.output_dir": run,
             **{k.replace("__", "."): v for k, v in overrides.items()}}
    return ["train", str(ROOT / "configs" / "tiny.yaml"), *(f"{k}={v}" for k, v in extra.items())]


def launcher(kind: str) -> list[str]:
    """The command before `train ...`: one process, torchrun or accelerate launch with FSDP2."""
    if kind == "one":
        return [sys.executable, "-m", "softpo.cli"]
    if kind == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port()), "-m", "softpo.cli"]
    assert kind == "fsdp", kind
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
            "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "softpo.cli"]


def env() -> dict[str, str]:
    """One thread per process (the in-process runs compared bit for bit use one too)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run(kind: str, args: list[str], extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """Run to the end; fails the test on a non-zero exit."""
    proc = subprocess.run([*launcher(kind), *args], cwd=ROOT, env={**env(), **(extra_env or {})},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, errors(proc.stderr)
    return proc


def errors(stderr: str) -> str:
    """What failed: the lines naming an error, then the end of stderr."""
    named = [line for line in stderr.splitlines() if "Error" in line or "error:" in line]
    return "\n".join(named[-20:]) + "\n...\n" + stderr[-2000:]


def last_logged_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return max((json.loads(line)["step"] for line in lines), default=0)
    except (OSError, ValueError, KeyError):  # not there yet, or a line being written
        return 0


def signal_at_step(command: list[str], run_dir: Path, step: int, sig: int,
                   to: str = "launcher", extra_env: dict | None = None) -> tuple[int, str]:
    """Start `command` (training into `run_dir`), send `sig` once step `step` is logged -- to the
    command's process, or with `to="rank1"` to the second worker only -- and wait:
    (exit code, stdout and stderr)."""
    import psutil

    proc = subprocess.Popen(command, cwd=ROOT, env={**env(), **(extra_env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while last_logged_step(run_dir) < step:
        assert proc.poll() is None, f"training ended before the signal: {proc.stdout.read()}"
        assert time.monotonic() < deadline, "training made no progress"
        time.sleep(0.01)
    pid = proc.pid
    if to == "rank1":
        workers = psutil.Process(proc.pid).children(recursive=True)
        pid = next(w.pid for w in workers if w.environ().get("RANK") == "1")
    os.kill(pid, sig)
    output, _ = proc.communicate(timeout=300)
    return proc.returncode, output


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The trained weights in `final/`: the model, or the LoRA adapter."""
    final = run_dir / "final"
    path = final / "model.safetensors"
    return load_file(str(path if path.exists() else final / "adapter_model.safetensors"))


def assert_bitwise_equal(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def stop_lines(stderr: str) -> list[str]:
    """The lines saying where a stopped run's checkpoint is."""
    return [line for line in stderr.splitlines() if line.startswith("softpo: SIG")]



# Torch on one thread in this process, as in the subprocesses (`env`).
from softpo.lab import one_thread  # noqa: E402,F401
