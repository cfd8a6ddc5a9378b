"""The training stack on tiny local models: loss values through the whole stack, the regulariser's
gradient, kill-and-resume, every baseline through the same command, and the run directory."""

import json
from pathlib import Path

import pytest
import torch

from softpo import cli
from softpo.collate import TokenizedExample, collate
from softpo.config import load_config
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
    args = ["train", str(ROOT / "configs" / "tiny.yaml"),
            *tiny_overrides(tmp_path, **{"loss.name": loss, "train.max_steps": 2})]
    assert cli.main(args) == 0
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    assert train_rows and all(isinstance(r["loss"], float) for r in train_rows)
    assert (tmp_path / "run" / "final" / "config.yaml").is_file()


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
