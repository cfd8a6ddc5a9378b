"""Numerical parity with TRL through its trainers' own code paths (TRL is a dev dependency only).

On one tiny model and one batch of four pairs, TRL's `compute_loss` (its collator, its forward, its
loss) and softpo's `Trainer.forward_loss` (its collation, its response-only chunked log-probs, its
registered loss) must give the same loss and the same gradient:

* DPO:  TRL `DPOTrainer(loss_type="sigmoid", beta=b)` computes
        mean_i -log sigmoid(b * ((pi_w - ref_w) - (pi_l - ref_l))), softpo's `dpo` the same sum / B.
* f-DPO: TRL `DPOTrainer(loss_type="sigmoid", f_divergence_type=f)` and softpo's `fdpo` with
        `loss.f_divergence=f` (forward_kl, js_divergence): the same loss and gradient.
* SPO:  TRL `CPOTrainer(loss_type="sigmoid", cpo_alpha=0, beta=a)` computes
        mean_i -log sigmoid(a * (pi_w - pi_l)); softpo's `spo` is -(1/a) log sigmoid(a * (pi_w - pi_l)),
        so   softpo_loss * a == trl_loss   and   softpo_grad * a == trl_grad
        (identical at a = 1; for a != 1 the factor is exactly 1/a, the same minimiser).

Both trainers score the very same token ids: the batch is the one TRL's collator builds from its
tokenised dataset, re-collated by softpo (for DPO, softpo's own tokenisation of the rows is checked to
give those ids too). Float32, no autocast; tolerances are float32 round-off, ~1e-6 relative.
"""

import copy
import json

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from softpo.collate import TokenizedExample, collate  # noqa: E402
from softpo.config import load_config  # noqa: E402
from softpo.losses import ListLogps, LossParams, get_loss  # noqa: E402
from softpo.trainer import StepStats, Trainer  # noqa: E402

# Lengths differ on purpose: chosen longer in some rows, rejected longer in others (padding matters).
ROWS = [{"prompt": f"How was the {thing}?", "chosen": f" It was {good}.", "rejected": f" It was {bad}."}
        for thing, good, bad in [("soup", "warm and lovely", "cold"), ("train", "on time", "late, slow, loud"),
                                 ("book", "kind", "dull"), ("lake", "calm and clear today", "dirty")]]


def softpo_trainer(tmp_path, loss: str, noise: float = 0.05, **extra) -> Trainer:
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    overrides = {"data.train": data, "data.eval_fraction": 0, "data.max_length": 64,
                 "data.max_prompt_length": 32, "model.tiny.n_layer": 1, "model.tiny.n_embd": 32,
                 "model.tiny.n_head": 2, "train.output_dir": tmp_path / "run", "train.batch_size": 4,
                 "train.progress": False, "train.report_to": "[]", "loss.name": loss, **extra}
    t = Trainer(load_config(None, [f"{k}={v}" for k, v in overrides.items()]))
    with torch.no_grad():  # move the policy off the reference so that log-ratios are not zero
        g = torch.Generator().manual_seed(1)
        for p in t.policy.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g).to(p.device))
    return t


def common_args(tmp_path) -> dict:
    return dict(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, report_to=[],
                per_device_train_batch_size=4, gradient_checkpointing=False, save_strategy="no",
                logging_strategy="no", max_length=64)


def softpo_loss_and_grads(t: Trainer, examples: list[TokenizedExample]):
    # the policy's device: TRL's `use_cpu` trainer resets Accelerate's shared state to the CPU
    batch = collate(examples, t.tokenizer.pad_token_id).to(next(t.policy.parameters()).device)
    loss = t.forward_loss(batch, False, StepStats(), scale=1.0 / len(examples))  # mean over pairs
    model = t.acc.unwrap_model(t.scorer).model
    loss.backward()
    return loss.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters()}


def trl_loss_and_grads(trainer, items: list[dict]):
    loss = trainer.compute_loss(trainer.model, trainer.data_collator(items))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()}


def assert_grads_close(got: dict, want: dict, factor: float = 1.0) -> None:
    """Elementwise, up to float32 summation-order noise: each gradient is a sum of many products
    taken in a different order by the two code paths (TRL also scores the prompt positions and
    zeroes them), so the absolute slack is relative to the tensor's largest entry."""
    assert set(got) == set(want)
    for name in want:
        scale = float(want[name].abs().max())
        torch.testing.assert_close(got[name] * factor, want[name], rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert any(w.abs().sum() > 0 for w in want.values())


def trl_dpo_trainer(tmp_path, t: Trainer, **config):
    """TRL's DPOTrainer on copies of softpo's policy and reference, and the batch it collates,
    as TRL's items and as softpo's examples (softpo's own tokenisation is checked to agree)."""
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**common_args(tmp_path), loss_type="sigmoid", **config)
    trainer = DPOTrainer(model=copy.deepcopy(t.acc.unwrap_model(t.scorer).model),
                         ref_model=copy.deepcopy(t.reference.model), args=args,
                         train_dataset=datasets.Dataset.from_list(ROWS), processing_class=t.tokenizer)
    items = [trainer.train_dataset[i] for i in range(len(ROWS))]
    examples = [TokenizedExample(list(r["prompt_ids"]), [list(r["chosen_ids"]), list(r["rejected_ids"])],
                                 "pairs", "rows", i, r["prompt"]) for i, r in enumerate(items)]
    for ours, theirs in zip(t.train_set, examples):  # softpo's own tokenisation gives TRL's ids
        assert (ours.prompt_ids, ours.response_ids) == (theirs.prompt_ids, theirs.response_ids)
    return trainer, items, examples


def test_dpo_equals_trl_dpo_trainer(tmp_path):
    t = softpo_trainer(tmp_path, "dpo", **{"loss.beta": 0.3})
    trainer, items, examples = trl_dpo_trainer(tmp_path, t, beta=0.3)
    want_loss, want_grads = trl_loss_and_grads(trainer, items)
    got_loss, got_grads = softpo_loss_and_grads(t, examples)
    torch.testing.assert_close(got_loss, want_loss, rtol=2e-6, atol=1e-6)
    assert_grads_close(got_grads, want_grads)
    assert float(want_loss) > 0.05  # a real, non-degenerate loss value


def capture_trl_logps(trainer) -> dict:
    """Hooks that keep TRL's per-token log-probs (policy with its gradient, reference) of the
    next forward: rows [chosen..., rejected...], zero off the completion."""
    got = {}

    def keep(name):
        def hook(module, args, kwargs, out):
            if name == "policy":
                out.log_probs.retain_grad()
            got[name] = out.log_probs
        return hook
    trainer.model.register_forward_hook(keep("policy"), with_kwargs=True)
    trainer.ref_model.register_forward_hook(keep("ref"), with_kwargs=True)
    return got


@pytest.mark.parametrize("divergence", ["forward_kl", "js_divergence"])
def test_fdpo_equals_trl_dpo_trainer_with_f_divergence(tmp_path, divergence):
    """f-DPO: TRL `DPOTrainer(loss_type="sigmoid", f_divergence_type=f)` computes
    mean_i -log sigmoid(b (s(u_w) - s(u_l))) with s = f' of the ratio (forward KL 1 - e^-u, JS
    log 2 + log sigmoid(u)); softpo's `fdpo` with loss.f_divergence = f the same up to constants in
    s that cancel.

    1. On TRL's own summed log-probs of this batch, softpo's `fdpo` gives TRL's loss and TRL's
       gradient with respect to each sequence's log-prob, to float32 round-off.  With the DPO test
       above (same forward, same log-probs and their gradients in the model) this is the parity of
       the whole gradient, by the chain rule.
    2. End to end through `Trainer.forward_loss` (the config key reaches the loss): the losses agree
       to 5e-5 relative, and differ from DPO's by more than 1e-3.  The tolerance is wider than DPO's
       because the two code paths sum float32 log-probs of about -150 in different orders (round-off
       ~1e-5) and s' = e^-u (forward KL) multiplies it; the policy is moved less off the reference
       (noise 0.01) to keep e^-u near 1.
    """
    t = softpo_trainer(tmp_path, "fdpo", noise=0.01,
                       **{"loss.beta": 0.3, "loss.f_divergence": divergence})
    trainer, items, examples = trl_dpo_trainer(tmp_path, t, beta=0.3, f_divergence_type=divergence)
    got = capture_trl_logps(trainer)
    want_loss, _ = trl_loss_and_grads(trainer, items)
    B = len(items)
    policy = got["policy"].detach().sum(1).view(2, B).T.contiguous()  # (B, 2) chosen, rejected
    ref = got["ref"].detach().sum(1).view(2, B).T.contiguous()  # (B, 2)
    # TRL sums each row of log_probs, so every entry of a row has the row's d loss / d logp
    row_grads = got["policy"].grad  # (2B, T)
    assert torch.equal(row_grads, row_grads[:, :1].expand_as(row_grads))
    trl_grad = row_grads[:, 0].view(2, B).T  # (B, 2)
    lp = ListLogps(policy.clone().requires_grad_(), torch.ones_like(policy), ref_logps=ref)
    ours = get_loss("fdpo").fn(lp, LossParams(beta=0.3, f_divergence=divergence)).losses.mean()
    ours.backward()
    torch.testing.assert_close(ours.detach(), want_loss, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(lp.policy_logps.grad, trl_grad, rtol=1e-5, atol=1e-7)
    assert float(trl_grad.abs().min()) > 1e-3  # every sequence carries gradient

    got_loss, _ = softpo_loss_and_grads(t, examples)
    torch.testing.assert_close(got_loss, want_loss, rtol=5e-5, atol=0)
    (tmp_path / "dpo").mkdir()
    dpo = softpo_trainer(tmp_path / "dpo", "dpo", noise=0.01, **{"loss.beta": 0.3})
    dpo_loss, _ = softpo_loss_and_grads(dpo, examples)
    assert abs(float(dpo_loss) - float(got_loss)) > 1e-3  # the divergence really changed the loss


def cpo_examples(items: list[dict]) -> list[TokenizedExample]:
    """CPO rows hold prompt+response ids with labels -100 on the prompt: split them back."""
    out = []
    for i, r in enumerate(items):
        prompt = list(r["prompt_input_ids"])
        responses = []
        for side in ("chosen", "rejected"):
            ids, labels = list(r[f"{side}_input_ids"]), list(r[f"{side}_labels"])
            assert ids[:len(prompt)] == prompt and all(x == -100 for x in labels[:len(prompt)])
            responses.append(ids[len(prompt):])
        out.append(TokenizedExample(prompt, responses, "pairs", "rows", i, r["prompt"]))
    return out


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_spo_pairwise_equals_trl_cpo_sigmoid_without_bc_term(tmp_path, alpha):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    t = softpo_trainer(tmp_path, "spo", **{"loss.alpha": alpha, "loss.beta": 0})
    assert t.reference is None  # SPO's pairwise term builds no reference model at all
    args = CPOConfig(**common_args(tmp_path), beta=alpha, loss_type="sigmoid", cpo_alpha=0.0)
    trainer = CPOTrainer(model=copy.deepcopy(t.acc.unwrap_model(t.scorer).model), args=args,
                         train_dataset=datasets.Dataset.from_list(ROWS), processing_class=t.tokenizer)
    items = [trainer.train_dataset[i] for i in range(len(ROWS))]

    want_loss, want_grads = trl_loss_and_grads(trainer, items)
    got_loss, got_grads = softpo_loss_and_grads(t, cpo_examples(items))
    if alpha == 1.0:
        torch.testing.assert_close(got_loss, want_loss, rtol=2e-6, atol=1e-6)
        assert_grads_close(got_grads, want_grads)
    else:
        assert not torch.allclose(got_loss, want_loss)  # the 1/alpha factor is really there
    torch.testing.assert_close(got_loss * alpha, want_loss, rtol=2e-6, atol=1e-6)
    assert_grads_close(got_grads, want_grads, factor=alpha)
    assert float(want_loss) > 0.05  # a real, non-degenerate loss value
