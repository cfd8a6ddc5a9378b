"""The benchmark drives softpo's Trainer through a few seams (bench/worker.py: its own row order via
`micro_batch_items`, timed `refresh_samples`, `reg.samples`, `train_set`, `spec`, `scorer`, and the
module attribute `logprobs.LOGIT_BUDGET`). Two steps of the tiny case, with the regulariser and
with `model.full_logits`, check that they still hold: this measures nothing."""

from __future__ import annotations

import math

import pytest

from bench import worker
from bench.cases import CASES, PAIRS, VARIANTS
from softpo import logprobs


@pytest.fixture(scope="module")
def tiny_case(tmp_path_factory):
    """The tiny case's model and rows, built once into a temporary cache."""
    from bench import assets

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOFTPO_CACHE", str(tmp_path_factory.mktemp("cache")))
        case = CASES["tiny"]
        yield case, assets.model_path(case), assets.data_path(case, worker.rows_needed(STEPS))


STEPS = 2


@pytest.mark.parametrize("variant", ["spo-reg", "spo-full-logits"])
def test_the_benchmark_runs_softpo_through_its_seams(tmp_path, monkeypatch, tiny_case, variant,
                                                    full_logits_calls):
    # the worker patches this for its (one) process; put it back afterwards
    monkeypatch.setattr(logprobs, "LOGIT_BUDGET", logprobs.LOGIT_BUDGET)
    case, model, data = tiny_case
    r = worker.run_softpo(case, VARIANTS[variant], model, data, "fp32", STEPS, str(tmp_path))
    assert len(r["ends"]) == STEPS + 1 and len(r["flops"]) == STEPS
    assert all(f > 0 and math.isfinite(f) for f in r["flops"])
    assert len(r["examples"]) >= STEPS * PAIRS
    if variant == "spo-reg":  # the timed refresh ran at every step and saw the samples
        assert all(s > 0 for s in r["sampling"])
    # the path really taken
    assert len(full_logits_calls) == (STEPS if variant == "spo-full-logits" else 0)


def test_a_workload_sets_the_rows_lengths_and_the_step(tmp_path, monkeypatch, tiny_case):
    """`--pairs 4 --max-length 64`: every prompt and response within the workload's ranges (so
    nothing is truncated), and the worker's steps take 4 pairs each."""
    from bench import assets
    from bench.cases import Workload

    monkeypatch.setattr(logprobs, "LOGIT_BUDGET", logprobs.LOGIT_BUDGET)
    case, model, _ = tiny_case
    work = Workload(pairs=4, max_length=64)
    data = assets.data_path(case, worker.rows_needed(STEPS, work), work)
    rows = assets.read_rows(data)
    prompts = [len(r["prompt"].split()) for r in rows]
    responses = [len(r[k].split()) for r in rows for k in ("chosen", "rejected")]
    assert (min(prompts), max(prompts)) == (16, 32) and (min(responses), max(responses)) == (16, 31)
    r = worker.run_softpo(case, VARIANTS["spo"], model, data, "fp32", STEPS, str(tmp_path),
                          work=work)
    assert len(r["ends"]) == STEPS + 1
    assert max(p + max(rs) for p, rs in r["examples"]) <= 64  # EOS included: never cut
    with pytest.raises(ValueError, match="workload"):
        Workload(pairs=1)


def test_profile_writes_the_table_of_the_steps_operators(tmp_path, monkeypatch, tiny_case):
    monkeypatch.setattr(logprobs, "LOGIT_BUDGET", logprobs.LOGIT_BUDGET)
    case, model, data = tiny_case
    out = tmp_path / "profile.txt"
    worker.run_softpo(case, VARIANTS["spo"], model, data, "fp32", STEPS, str(tmp_path / "run"),
                      profile=out)
    text = out.read_text()
    assert "Self CPU" in text and "aten::" in text
