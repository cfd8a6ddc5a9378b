"""Metric sinks: TensorBoard event files and `metrics.jsonl` in the run directory (main process only)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


class MetricsWriter:
    """Writes metrics to TensorBoard and metrics.jsonl (main process only)."""

    def __init__(self, run_dir: Path, sinks: list[str], enabled: bool = True):
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if "jsonl" in sinks:
            self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if "tensorboard" in sinks:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record `metrics` at `step` (non-finite numbers as strings in JSON)."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        if self.jsonl is not None:
            row = {"step": step, "time": round(time.time(), 3),
                   **{k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()}}
            self.jsonl.write(json.dumps(row) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            for k, v in clean.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        """Flush and close the sinks."""
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl (for reports and tests)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
