"""The training stack on tiny local models: loss values through the whole stack, the regulariser's
gradient, gradient accumulation, the learning-rate schedule, kill-and-resume, every baseline through
the same command, and the run directory."""

import json
import math
from pathlib import Path

import pytest
import torch

from softpo import cli
from softpo.build import learning_rate
from softpo.collate import TokenizedExample, collate
from softpo.config import Config, load_config
from softpo.losses import KL_ESTIMATORS, LOSSES, ListLogps, SampleLogps
from softpo.trainer import StepStats, Trainer
from softpo.tracking import read_metrics

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data" / "prefs_tiny.jsonl"


def tiny_overrides(tmp_path, **extra):
    base = {
        "data.train": str(DATA), "data.max_length": 64, "data.max_prompt_length": 32,
        "model.tiny.n_layer": 1, "model.tiny.n_embd": 32, "model.tiny.n_head": 2,
        "train.output_dir": str(tmp_path / "run"), "train.max_steps": 4, "train.batch_size": 4,
        "train.logging_steps": 1, "train.eval_steps": 0, "train.save_steps": 0,
        "train.progress": False, "train.eval_batch_size": 32,
        "regularizer.prompts_per_step": 2, "regularizer.max_new_tokens": 8,
        "optim.lr": 1e-2, "optim.warmup_steps": 0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def make_trainer(tmp_path, **extra) -> Trainer:
    return Trainer(load_config(ROOT / "configs" / "tiny.yaml", tiny_overrides(tmp_path, **extra)))


def full_forward_logps(model, batch) -> torch.Tensor:
    """Independent oracle: the plain HF forward, log-softmax over the full vocabulary.  (R,)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logps = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch.input_ids[:, 1:, None])
    return (logps[..., 0] * batch.response_mask[:, 1:]).sum(-1)


def hand_batch():
    """Two examples with hand-chosen token ids; the second has a shorter response and prompt."""
    a = TokenizedExample([5, 6, 7], [[8, 9, 10], [11, 12]], "pairs", "hand", 1, "p1")
    b = TokenizedExample([5], [[13, 14], [15, 16, 17, 18]], "pairs", "hand", 2, "p2")
    return collate([a, b], pad_token_id=0)


@pytest.mark.parametrize("loss", ["spo", "dpo", "ipo", "simpo", "cpo", "orpo", "rdpo"])
def test_loss_through_stack_equals_losses_py(tmp_path, loss):
    t = make_trainer(tmp_path, **{"loss.name": loss, "loss.beta": 0.5 if loss != "spo" else 0.0,
                                  "loss.alpha": 0.7})
    with torch.no_grad():  # move the policy away from the reference so ratios are not zero
        for p in t.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = hand_batch().to(t.acc.device)  # the oracle below runs where the model is
    stats = StepStats()
    loss_value = t.forward_loss(batch, False, stats, scale=1.0)
    model = t.acc.unwrap_model(t.scorer).model
    policy = full_forward_logps(model, batch).view(2, 2)
    ref = full_forward_logps(t.reference.model, batch).view(2, 2) if t.reference else None
    expected = LOSSES[loss].fn(ListLogps(policy, batch.response_lengths.float(), None,
                                         ref if LOSSES[loss].needs_ref else None), t.params)
    torch.testing.assert_close(loss_value, expected.losses.sum(), rtol=1e-5, atol=1e-5)
    assert abs(stats.sums["logps/chosen"] - float(policy[:, 0].sum().detach())) < 1e-4


@pytest.mark.parametrize("estimator", ["token", "seq", "token_sf"])
def test_regularizer_gradient_matches_definition(tmp_path, estimator):
    """The trainer's chunked regulariser gradient equals autograd through the definition, computed
    from full-vocabulary logits of the policy and the reference on the same samples."""
    t = make_trainer(tmp_path, **{"loss.beta": 0.3, "regularizer.estimator": estimator})
    with torch.no_grad():
        for p in t.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    t.refresh_samples(0)
    s = t.reg.samples
    model = t.acc.unwrap_model(t.scorer).model
    params = [p for p in model.parameters() if p.requires_grad]

    scores = t.scorer(hand_batch().to(t.acc.device), s.rows, t.reg.ref_hidden,
                      t.reference.head if t.reg.ref_hidden is not None else None)
    got = torch.autograd.grad(t.regularizer.loss(scores)[0], params, allow_unused=True)

    rows = s.rows
    logits = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask).logits[:, :-1]
    with torch.no_grad():
        ref_logits = t.reference.model(input_ids=rows.input_ids,
                                       attention_mask=rows.attention_mask).logits[:, :-1]
    mask = rows.response_mask[:, 1:].float()
    logp_all, ref_all = logits.float().log_softmax(-1), ref_logits.float().log_softmax(-1)
    tok = logp_all.gather(-1, rows.input_ids[:, 1:, None])[..., 0]
    ref_tok = ref_all.gather(-1, rows.input_ids[:, 1:, None])[..., 0]
    kl = (logp_all.exp() * (logp_all - ref_all)).sum(-1)
    P, k = s.num_prompts, s.samples_per_prompt
    sl = SampleLogps(tok.view(P, k, -1), ref_tok.view(P, k, -1), mask.view(P, k, -1),
                     kl.view(P, k, -1))
    want = torch.autograd.grad(0.3 * KL_ESTIMATORS[estimator](sl).surrogate.mean(), params,
                               allow_unused=True)
    for g, w in zip(got, want):
        if w is None:
            continue
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert any(w is not None and w.abs().sum() > 0 for w in want)


class Crash(Exception):
    pass


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    extra = {"train.max_steps": 6, "train.save_steps": 2, "loss.beta": 0.1,
             "regularizer.sample_every": 3}
    straight = make_trainer(tmp_path / "a", **extra)
    straight.train()
    want = {k: v.clone() for k, v in straight.acc.unwrap_model(straight.scorer).state_dict().items()}

    crashing = make_trainer(tmp_path / "b", **extra)
    original = crashing.train_step

    def step_then_crash():
        if crashing.step == 5:  # checkpoints exist for steps 2 and 4; step 5 is lost
            raise Crash
        return original()

    crashing.train_step = step_then_crash
    with pytest.raises(Crash):
        crashing.train()
    resumed = make_trainer(tmp_path / "b", **extra, **{"train.resume": True})
    resumed.train()
    assert resumed.step == 6
    got = resumed.acc.unwrap_model(resumed.scorer).state_dict()
    for name, value in want.items():
        assert torch.equal(got[name], value), name


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_loss_trains_through_the_command(tmp_path, loss):
    """Two logged steps per loss, each with a finite loss and gradient norm and no skipped
    (non-finite) update, and the final model saved."""
    args = ["train", str(ROOT / "configs" / "tiny.yaml"),
            *tiny_overrides(tmp_path, **{"loss.name": loss, "train.max_steps": 2})]
    assert cli.main(args) == 0
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    for r in train_rows:  # metrics.jsonl writes a non-finite number as a string: both are caught
        assert isinstance(r["loss"], float) and math.isfinite(r["loss"]), r
        assert isinstance(r["grad_norm"], float) and math.isfinite(r["grad_norm"]), r
        assert r["nonfinite_steps"] == 0.0, r
    assert (tmp_path / "run" / "final" / "config.yaml").is_file()


@pytest.mark.parametrize("loss,beta", [("spo", 0.3), ("dpo", 0.5)])
def test_gradient_accumulation_equals_one_large_batch(tmp_path, loss, beta):
    """grad_accum = 2 micro-batches of 2 examples take the gradient of one batch of 4: the same
    examples (stream positions 0..3 of step 0), each micro-batch's summed loss scaled by
    1 / (2 * 2), the regulariser's surrogate (SPO, beta > 0) added once, on the same samples. The
    gradient handed to clipping and the step's metrics agree up to float rounding (the
    micro-batches are padded to other widths, so sums run in another order): 1e-5 of the largest
    gradient entry, as in tests/test_step_equivalence.py."""
    runs = {}
    for accum, batch_size in ((1, 4), (2, 2)):
        t = make_trainer(tmp_path / f"accum{accum}", **{
            "loss.name": loss, "loss.beta": beta, "train.grad_accum": accum,
            "train.batch_size": batch_size})
        params = [p for p in t.scorer.parameters() if p.requires_grad]
        seen, clip = {}, t._clip

        def recording_clip(clip=clip, params=params, seen=seen):
            seen["grads"] = [p.grad.clone() for p in params]
            return clip()

        t._clip = recording_clip
        rows = [e.row for micro in range(accum) for e in t.micro_batch_items(0, micro)]
        metrics = t.train_step()
        runs[accum] = {"rows": rows, "grads": seen["grads"], "metrics": metrics}
    one, two = runs[1], runs[2]
    assert one["rows"] == two["rows"] and len(one["rows"]) == 4
    scale = max(float(g.abs().max()) for g in one["grads"])
    assert scale > 0
    for a, b in zip(two["grads"], one["grads"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * scale)
    for key in ("loss", "pref_loss", "grad_norm", "rewards/accuracies") + (("kl",) if beta and
                                                                            loss == "spo" else ()):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-5, abs=1e-6), key


def test_learning_rate_schedule_hand_values():
    """Peak 1, 2 warmup steps, 6 steps: warmup (step + 1) / 2 = 0.5, 1; then progress
    p = (step - 2) / 4: cosine 0.5 (1 + cos(pi p)) = 1, 0.8536, 0.5, 0.1464; linear 1 - p = 1,
    0.75, 0.5, 0.25; constant 1. Without warmup, step 0 is the peak."""
    cfg = Config()
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.train.max_steps = 1.0, 2, 6
    want = {"cosine": [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5,
                       0.5 * (1 + math.cos(3 * math.pi / 4))],
            "linear": [0.5, 1.0, 1.0, 0.75, 0.5, 0.25], "constant": [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]}
    for scheduler, values in want.items():
        cfg.optim.scheduler = scheduler
        assert [learning_rate(cfg, step) for step in range(6)] == pytest.approx(values, abs=1e-12)
    cfg.optim.warmup_steps, cfg.optim.scheduler = 0, "cosine"
    assert learning_rate(cfg, 0) == 1.0 and learning_rate(cfg, 3) == pytest.approx(0.5)


def test_tiny_run_learns_and_writes_its_run_directory(tmp_path):
    t = make_trainer(tmp_path, **{"train.max_steps": 24, "train.batch_size": 8,
                                  "train.save_steps": 12, "train.eval_steps": 12,
                                  "loss.beta": 0.05})
    before = t.evaluate()["eval_rewards/accuracies"]
    metrics = t.train()
    run = tmp_path / "run"
    assert metrics["eval_rewards/accuracies"] >= 0.9 > before + 0.2
    assert (run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "step-0000012" / "manifest.json").is_file()
    assert (run / "final" / "model.safetensors").is_file()
    assert "eval_rewards/accuracies" in (run / "final" / "README.md").read_text()
    logged = read_metrics(run / "metrics.jsonl")
    assert any("kl" in r for r in logged) and any("eval_rewards/accuracies" in r for r in logged)
    assert json.loads((run / "checkpoints" / "step-0000012" / "trainer_state.json").read_text())[
        "step"] == 12


def test_config_reference_is_current():
    """docs/config.md is generated from the dataclasses; regenerate with `python -m softpo.config`."""
    from softpo.config import reference_markdown

    assert (ROOT / "docs" / "config.md").read_text() == reference_markdown()
