"""Measuring one model of the demo (softpo/demo.py): exactly on the task's candidate sets and by
sampling, against the same held-out prompts, seeds and expert for every model.

A `Point` names a model: the loss and knobs it was trained with (none: the reference) and the
temperature it is measured at; a `Harness` holds what every model of one seed is measured with.
`measure` returns the model's entry of results.json (`softpo.demo_report` documents it):

    exact    `softpo.candidates`: every candidate answer's exact probability at the temperature,
             the means over the held-out prompts (success, outside, entropy, coverage, kl_expert
             to softmax(r / T_labels), ...); each prompt's in `candidates_<name>.json`
    sampled  `softpo.sampled_eval`: k answers per prompt at the temperature (seed EVAL_SEED +
             seed for every model), pass@j, distinct_correct, KL to the reference (T = 1 only);
             every sample in `samples_<name>.jsonl`
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from softpo.config import DataConfig

EVAL_SEED = 10_000  # held-out sampling seed offset: the training samples never reuse it


@dataclass
class Clock:
    """Seconds per phase: wall-clock, and CPU seconds of this process (all its threads), which a
    shared machine inflates less than the wall clock."""

    wall: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str):
        """Time the block as phase `name`."""
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = round(time.perf_counter() - t0, 1)
            self.cpu[name] = round(time.process_time() - c0, 1)

    def add(self, other: Clock) -> None:
        """Take over `other`'s phases."""
        self.wall.update(other.wall)
        self.cpu.update(other.cpu)

    def close(self) -> None:
        """Add the `total` of the phases."""
        for d in (self.wall, self.cpu):
            d["total"] = round(sum(v for k, v in d.items() if k != "total"), 1)


@dataclass(frozen=True)
class Point:
    """One evaluated model: the loss and knobs it was trained with (no loss: the reference) and
    the temperature it is sampled and scored at."""

    loss: str | None = None
    alpha: float = 1.0
    beta: float = 0.0
    f_divergence: str = "reverse_kl"
    temperature: float = 1.0

    @property
    def run(self) -> str:
        """The training's name (shared by the temperatures of one trained model)."""
        return {None: "reference", "spo": f"spo_alpha{self.alpha:g}",
                "dpo": f"dpo_beta{self.beta:g}", "hdpo": f"hdpo_alpha{self.alpha:g}",
                "fdpo": f"fdpo_{self.f_divergence}"}[self.loss]

    @property
    def name(self) -> str:
        """The model's name in the reports: the training's, and `_T<t>` at another temperature."""
        return self.run + ("" if self.temperature == 1.0 else f"_T{self.temperature:g}")

    @property
    def method(self) -> str:
        """`reference` or the loss."""
        return self.loss or "reference"

    @property
    def knobs(self) -> dict[str, Any]:
        """The loss's hyper-parameters that the plan varies."""
        return {None: {}, "spo": {"alpha": self.alpha, "beta": self.beta},
                "dpo": {"beta": self.beta}, "hdpo": {"alpha": self.alpha, "beta": self.beta},
                "fdpo": {"beta": self.beta, "f_divergence": self.f_divergence}}[self.loss]


@dataclass
class Harness:
    """What every model of one seed is measured with: the same held-out prompts, candidate rows,
    sampling seed and expert; the clock of its phases."""

    seed: int
    out: Path  # the run's folder
    task: Any  # softpo.tasks.Task
    expert_temperature: float  # kl_expert compares with softmax(r / this)
    k: int  # samples per held-out prompt
    max_new_tokens: int
    tokenizer: Any
    data_cfg: DataConfig  # prompts encoded as training encodes them
    prompts: list  # held-out prompts
    rows: list | None  # their candidate rows (softpo.candidates.CandidateRow); None: no sets
    expert: Any  # softpo.sampled_eval.ExpertCache, shared by every model
    progress: bool = True
    clock: Clock = field(default_factory=Clock)


def candidate_layout(model) -> str:
    """`packed` (each prompt once) where the model takes a 4-D mask, else `padded`."""
    from softpo.packing import packable_style

    try:
        packable_style(model)
    except ValueError:
        return "padded"
    return "packed"


def exact_metrics(h: Harness, point: Point, model) -> dict | None:
    """Every candidate's exact probability at the point's temperature (`candidates_<name>.json`
    holds each prompt's); the means over prompts. None for a task without candidate sets."""
    from softpo.candidates import evaluate_candidates

    if h.rows is None:
        return None
    report = evaluate_candidates(model, h.tokenizer, h.rows, alpha=h.expert_temperature,
                                 temperature=point.temperature, layout=candidate_layout(model))
    (h.out / f"candidates_{point.name}.json").write_text(json.dumps(report.as_dict(), indent=1))
    return report.summary


def sampled_metrics(h: Harness, point: Point, model, reference) -> dict:
    """k sampled answers per held-out prompt at the point's temperature, scored by the expert
    (`samples_<name>.jsonl`); the numbers of `softpo.sampled_eval`."""
    from tqdm.auto import tqdm

    from softpo.prefs import write_jsonl
    from softpo.sampled_eval import EvalSettings, evaluate_model

    settings = EvalSettings(k=h.k, max_new_tokens=h.max_new_tokens,
                            seed=EVAL_SEED + h.seed, temperature=point.temperature,
                            success_threshold=h.task.success_threshold, data_cfg=h.data_cfg)
    bar = tqdm(total=len(h.prompts), desc=f"eval {point.name}", unit="prompt",
               disable=not h.progress)
    summary, records = evaluate_model(point.name, model, h.tokenizer, h.prompts, h.expert,
                                      settings, reference if point.temperature == 1.0 else None,
                                      bar)
    bar.close()
    write_jsonl(h.out / f"samples_{point.name}.jsonl", records)
    metrics = {k: v for k, v in summary.as_dict().items() if k != "model"}
    if point.loss is None and point.temperature == 1.0:
        metrics["kl"] = 0.0  # the reference itself
    return metrics


def measure(h: Harness, point: Point, model, reference, train: dict | None) -> dict:
    """One model's entry of results.json (`softpo.demo_report` documents it)."""
    with h.clock.phase(f"eval/{point.name}"):
        metrics = {"exact": exact_metrics(h, point, model),
                   "sampled": sampled_metrics(h, point, model, reference), "train": train}
    return {"name": point.name, "method": point.method, "loss": point.loss, "knobs": point.knobs,
            "temperature": point.temperature, "run": None if point.loss is None else point.run,
            "metrics": metrics}


def expert_metrics(h: Harness) -> dict | None:
    """The exact metrics of the expert distribution softmax(r / T) itself (SPO's optimum at
    alpha 1 under these labels): where the frontier's target is."""
    import torch

    from softpo.candidates import PromptResult, candidate_metrics, summarise

    if h.rows is None:
        return None
    results = []
    for row in h.rows:
        r = torch.tensor(row.rewards, dtype=torch.float64)
        logps = torch.log_softmax(r / h.expert_temperature, 0)
        results.append(PromptResult(row.prompt, [], candidate_metrics(
            logps, row.rewards, alpha=h.expert_temperature)))
    return summarise(results)
