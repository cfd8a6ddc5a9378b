"""Preemption: SIGTERM (what a cluster sends before it stops a job) and SIGINT (Ctrl-C) end a
run cleanly. The current optimiser step finishes, all processes write one checkpoint together,
the main process prints one line saying where, and `softpo train` exits with `EXIT_PREEMPTED`
(75, EX_TEMPFAIL of sysexits.h: a temporary failure, try again). `softpo train ... --resume`
then continues from that checkpoint exactly as if the run had not stopped.

The handler only records the signal: it can arrive anywhere (inside a collective, a save, a
forward). After every step each process contributes what it received to one all-reduce
(`StopRequest.agreed`), so all processes stop after the same step even when the signal reached
only one of them, or reached them at different moments (`kill` on one pid).

A launcher forwards the signals it receives to its workers (torchrun and `accelerate launch` do,
then SIGKILL them after `TORCH_ELASTIC_SHUTDOWN_TIMEOUT` seconds, 30 by default), and a terminal's
Ctrl-C reaches the whole process group, so one request can arrive twice: a repeat within
`REPEAT_S` seconds of the first signal is the same request. A later one restores the previous
handlers and is delivered again: the behaviour without softpo, stop at once (SIGINT:
KeyboardInterrupt; SIGTERM: killed).
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import torch

EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_S = 2.0  # a signal this soon after the first is the same request (forwarded, Ctrl-C)


class Preempted(Exception):
    """A run stopped on a signal after writing its checkpoint; the message is the line printed.
    `softpo train` exits with `EXIT_PREEMPTED`."""

    def __init__(self, signal_name: str, step: int, max_steps: int, checkpoint: Path | None):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        if checkpoint is not None and checkpoint.name.endswith(f"{step:07d}"):
            where = f"checkpoint written to {checkpoint}"
        elif checkpoint is not None:
            where = f"no checkpoint for this step; the last good one is {checkpoint}"
        else:
            where = "no checkpoint written"
        super().__init__(f"softpo: {signal_name}: stopped after step {step} of {max_steps}; "
                         f"{where}; continue with --resume (exit code {EXIT_PREEMPTED})")


class StopRequest:
    """A context manager: inside it, SIGTERM and SIGINT are recorded (`received`) instead of
    stopping the process; the previous handlers come back on exit. Outside the main thread (where
    Python cannot set handlers) it records nothing."""

    def __init__(self):
        self.received: int = 0  # the signal number, 0 for none
        self._since = 0.0  # time.monotonic() of the first signal
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if not self.received:
            self.received, self._since = signum, time.monotonic()
        elif time.monotonic() - self._since > REPEAT_S:  # asked again: stop at once
            self.__exit__()
            signal.raise_signal(signum)

    def agreed(self, acc) -> str | None:
        """Called after each step by every process together: the name of a signal some process
        received (the highest number if several), or None to go on."""
        flag = self.received
        if acc.num_processes > 1:
            t = torch.tensor([flag], dtype=torch.long, device=acc.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = int(t.item())
        return signal.Signals(flag).name if flag else None
