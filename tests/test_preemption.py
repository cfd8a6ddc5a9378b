"""Preemption (softpo/preemption.py): SIGTERM or SIGINT finishes the step, writes a checkpoint,
prints one line saying where and exits with code 75; `--resume` then ends with the weights of the
uninterrupted run, bit for bit. Real signals to real training subprocesses: one process, and two
under torchrun with the signal sent to one worker only (the others stop after the same step),
and the SLURM script of docs/scaling.md. The FSDP2 case under `accelerate launch` is in
tests/test_distributed.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import types

import pytest

from launch import (ROOT, assert_bitwise_equal, env, final_weights, free_port, last_logged_step,
                    launcher, one_thread, run, signal_at_step, stop_lines, train_args)
from softpo import checkpoint, cli, preemption
from softpo.preemption import EXIT_PREEMPTED, Preempted, StopRequest

MAX_STEPS = 12
# SPO with the global KL regulariser (fresh samples every 3 steps), no scheduled checkpoints:
# the only checkpoint a stopped run has is the one the signal made it write.
ARGS = dict(data__eval_fraction=0, loss__name="spo", loss__beta=0.1,
            regularizer__sample_every=3, regularizer__prompts_per_step=2,
            regularizer__max_new_tokens=8, train__max_steps=MAX_STEPS, train__batch_size=4,
            train__save_steps=0, train__eval_steps=0)


# ---------------------------------------------------------------- the handler and the exit code

def test_a_signal_is_recorded_and_a_quick_repeat_is_the_same_request():
    """One request can arrive twice (a launcher forwarding it, Ctrl-C to the process group):
    the process lives on, the first signal recorded; handlers come back on exit."""
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        signal.raise_signal(signal.SIGTERM)  # delivered to this thread, now
        signal.raise_signal(signal.SIGINT)
        assert stop.received == signal.SIGTERM
        assert stop.agreed(types.SimpleNamespace(num_processes=1)) == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_later_second_signal_stops_at_once():
    """Asked again after REPEAT_S seconds: the previous handler runs (SIGINT: KeyboardInterrupt).
    The previous handler is set here: other libraries loaded by earlier tests may replace it."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _second_signal_raises()
    finally:
        signal.signal(signal.SIGINT, before)


def _second_signal_raises():
    with StopRequest() as stop:
        signal.raise_signal(signal.SIGINT)
        stop._since -= preemption.REPEAT_S + 1
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_no_signal_agrees_to_go_on():
    with StopRequest() as stop:
        assert stop.agreed(types.SimpleNamespace(num_processes=1)) is None


def test_the_line_says_where(tmp_path):
    written = checkpoint.step_dir(tmp_path, 7)
    assert str(Preempted("SIGTERM", 7, 10, written)) == (
        f"softpo: SIGTERM: stopped after step 7 of 10; checkpoint written to {written}; "
        "continue with --resume (exit code 75)")
    older = checkpoint.step_dir(tmp_path, 4)
    assert "no checkpoint for this step; the last good one is" in str(
        Preempted("SIGINT", 7, 10, older))
    assert "no checkpoint written" in str(Preempted("SIGINT", 7, 10, None))


def test_softpo_train_exits_75_without_a_traceback(tmp_path, monkeypatch, capsys):
    """`softpo train` turns `Preempted` into exit code 75; the trainer printed the line."""
    import softpo.trainer

    class Stopped:
        def __init__(self, cfg):
            pass

        def train(self):
            raise Preempted("SIGTERM", 3, 10, None)

    monkeypatch.setattr(softpo.trainer, "Trainer", Stopped)
    assert cli.main(train_args(tmp_path / "run")) == EXIT_PREEMPTED
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.out == ""


# ---------------------------------------------------------------- real signals, real runs

@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted one-process run, in this process on one thread as the subprocesses
    (the same float reduction order)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    with one_thread():
        assert cli.main(train_args(out, **ARGS)) == 0
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_with_a_checkpoint_and_resume_is_exact(tmp_path, straight, sig):
    run_dir = tmp_path / "stopped"
    code, output = signal_at_step([*launcher("one"), *train_args(run_dir, **ARGS)], run_dir, 3,
                                  sig)
    assert code == EXIT_PREEMPTED, output[-3000:]
    assert "Traceback" not in output
    last = checkpoint.latest_complete(run_dir / "checkpoints")
    step = int(last.name.split("-")[1])
    assert 3 <= step < MAX_STEPS and last_logged_step(run_dir) == step  # the step finished
    assert stop_lines(output) == [f"softpo: {sig.name}: stopped after step {step} of "
                                  f"{MAX_STEPS}; checkpoint written to {last}; continue with "
                                  f"--resume (exit code 75)"]
    assert not (run_dir / "final").exists()

    resumed = run("one", train_args(run_dir, **ARGS) + ["--resume"])
    assert f"resumed from step {step}" in resumed.stdout
    assert_bitwise_equal(final_weights(run_dir), final_weights(straight))


@pytest.mark.slow
def test_two_processes_stop_together_and_resume_exactly(tmp_path):
    """torchrun, 2 processes; SIGTERM to the second worker alone. Both stop after the same step
    (the first says where, once), both exit 75, torchrun reports the failure; `--resume` under
    torchrun ends bit for bit where the uninterrupted 2-process run ends."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run("torchrun", train_args(straight, **ARGS))
    code, output = signal_at_step([*launcher("torchrun"), *train_args(stopped, **ARGS)], stopped,
                                  3, signal.SIGTERM, to="rank1")
    assert code != 0 and "exitcode: 75" in output and "exitcode: -" not in output
    last = checkpoint.latest_complete(stopped / "checkpoints")
    step = int(last.name.split("-")[1])
    assert 3 <= step < MAX_STEPS
    assert stop_lines(output) == [f"softpo: SIGTERM: stopped after step {step} of {MAX_STEPS}; "
                                  f"checkpoint written to {last}; continue with --resume "
                                  f"(exit code 75)"]
    assert {p.name for p in last.glob("regularizer_samples_*")} == {
        "regularizer_samples_0.safetensors", "regularizer_samples_1.safetensors"}

    resumed = run("torchrun", train_args(stopped, **ARGS) + ["--resume"])
    assert f"resumed from step {step}" in resumed.stdout
    assert_bitwise_equal(final_weights(stopped), final_weights(straight))


@pytest.mark.slow
def test_the_slurm_script_stops_requeues_and_resumes(tmp_path):
    """examples/slurm/train.sbatch (docs/scaling.md) run as SLURM runs it: bash, the
    time-limit SIGTERM sent to the script alone (`--signal=B:TERM@...`), `scontrol` recorded.
    FSDP2 with 2 processes: the workers write a checkpoint, the job requeues itself once, and
    the next start resumes from that checkpoint and ends."""
    bin_dir, calls, run_dir = tmp_path / "bin", tmp_path / "scontrol-calls", tmp_path / "run"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    script = ["bash", str(ROOT / "examples" / "slurm" / "train.sbatch"),
              *train_args(run_dir, **ARGS)[1:]]
    job = {"SLURM_JOB_ID": "4242", "NPROC": "2", "MASTER_PORT": str(free_port()),
           "PATH": os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable),
                                    os.environ["PATH"]])}
    code, output = signal_at_step(script, run_dir, 3, signal.SIGTERM, extra_env=job)
    assert code != 0 and calls.read_text() == "requeue 4242\n"
    last = checkpoint.latest_complete(run_dir / "checkpoints")
    step = int(last.name.split("-")[1])
    assert stop_lines(output) == [f"softpo: SIGTERM: stopped after step {step} of {MAX_STEPS}; "
                                  f"checkpoint written to {last}; continue with --resume "
                                  f"(exit code 75)"]
    assert "requeueing job 4242" in output and not (run_dir / "final").exists()

    again = subprocess.run(script, cwd=ROOT, env={**env(), **job}, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from step {step}" in again.stdout
    assert f"softpo: done: {run_dir / 'final'}" in again.stdout
    assert calls.read_text() == "requeue 4242\n"  # done: not requeued again
