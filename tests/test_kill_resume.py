"""A real `kill -9` of `softpo train` at a random moment, then `softpo train --resume`: the final
parameters equal, bit for bit, those of an uninterrupted run (CPU, fixed seed).

The run has the global KL regulariser on (loss.beta > 0) with fresh samples every 3 steps, so the
resumed run must redraw exactly the samples the uninterrupted run drew (sampling seeds are a
function of the step), and checkpoints every 2 steps, so the kill lands before, during or after a
save. The moment is drawn from a seeded generator: after a step >= a random target step has been
logged and a complete checkpoint exists, plus a random fraction of a step.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from softpo import checkpoint, cli
from softpo.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 10


def args(run: Path) -> list[str]:
    extra = {
        "data.train": ROOT / "examples" / "data" / "prefs_tiny.jsonl", "data.max_length": 64,
        "data.max_prompt_length": 32, "data.eval_fraction": 0,
        "model.tiny.n_layer": 1, "model.tiny.n_embd": 32, "model.tiny.n_head": 2,
        "loss.name": "spo", "loss.beta": 0.1, "regularizer.sample_every": 3,
        "regularizer.prompts_per_step": 2, "regularizer.max_new_tokens": 8,
        "optim.lr": 1e-2, "optim.warmup_steps": 2, "train.output_dir": run,
        "train.max_steps": MAX_STEPS, "train.batch_size": 4, "train.save_steps": 2,
        "train.save_total_limit": 2, "train.logging_steps": 1, "train.eval_steps": 0,
        "train.progress": False, "train.report_to": "[jsonl]",
    }
    return ["train", str(ROOT / "configs" / "tiny.yaml"), *(f"{k}={v}" for k, v in extra.items())]


def env() -> dict[str, str]:
    """Subprocesses use this process's thread count, so float reductions run in the same order."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(ROOT)}


def last_logged_step(run: Path) -> int:
    try:
        return max((r["step"] for r in read_metrics(run / "metrics.jsonl")), default=0)
    except (OSError, ValueError):  # not there yet, or a line being written
        return 0


def kill_at_random_step(run: Path, rng: random.Random) -> int:
    """Start `softpo train`, SIGKILL it mid-run; the step of the checkpoint it left."""
    target = rng.randint(3, MAX_STEPS - 3)
    proc = subprocess.Popen([sys.executable, "-m", "softpo.cli", *args(run)], env=env(),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while (last_logged_step(run) < target
           or checkpoint.latest_complete(run / "checkpoints") is None):
        assert proc.poll() is None, f"training ended before the kill: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "training made no progress"
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.3))  # anywhere inside a step, a save included
    assert proc.poll() is None, "training finished before the kill (machine too fast?)"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "final").exists()
    last = checkpoint.latest_complete(run / "checkpoints")
    return int(last.name.split("-")[1])


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert cli.main(args(straight)) == 0

    resumed_from = kill_at_random_step(killed, random.Random(20240527))
    assert 2 <= resumed_from < MAX_STEPS

    proc = subprocess.run([sys.executable, "-m", "softpo.cli", *args(killed), "--resume"],
                          env=env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"resumed from step {resumed_from}" in proc.stdout

    want = load_file(str(straight / "final" / "model.safetensors"))
    got = load_file(str(killed / "final" / "model.safetensors"))
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def test_resume_between_refreshes_reuses_the_saved_samples(tmp_path):
    """With sample_every=3, steps 0-2 use samples drawn at step 0 from the step-0 policy. A
    checkpoint at step 2 carries them; the resumed trainer takes them (it could only redraw from
    the step-2 policy), and its next step equals the uninterrupted one."""
    from softpo.config import load_config
    from softpo.trainer import Trainer

    a = args(tmp_path / "run")
    first = Trainer(load_config(a[1], a[2:]))
    first.train_step(), first.train_step()
    first.save_checkpoint()
    resumed = Trainer(load_config(a[1], a[2:] + ["train.resume=true"]))
    assert resumed.resume() and resumed.step == 2 and resumed.reg is not None
    s, r = first.reg.samples, resumed.reg.samples
    assert (r.num_prompts, r.samples_per_prompt) == (s.num_prompts, s.samples_per_prompt)
    for name in ("input_ids", "attention_mask", "response_mask"):
        assert torch.equal(getattr(r.rows, name), getattr(s.rows, name)), name
    assert torch.equal(r.response_lengths, s.response_lengths)
    assert torch.equal(resumed.reg.ref_token_logps, first.reg.ref_token_logps)
    first.train_step(), resumed.train_step()
    want = first.acc.unwrap_model(first.scorer).state_dict()
    for name, value in resumed.acc.unwrap_model(resumed.scorer).state_dict().items():
        assert torch.equal(value, want[name]), name
