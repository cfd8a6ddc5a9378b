"""The whole training step's gradient, in every layout, equals plain autograd.

The trainer's step runs fast paths: rows split into length groups (`logprobs.length_groups`), the
output layer as a hand-written autograd function (`logprobs._LabelLogSoftmax`) in chunks, packed
layouts (shared prompt, padding-free), a chunked exact token KL for the regulariser. Each is a
rewrite of the same sum, so the step's gradient must equal the one computed the plain way: every
row in one right-padded block through `model(...).logits`, a full log-softmax, the registered
loss on summed log-probs, and the global KL's surrogate from full-vocabulary logits of the policy
and the reference on the same fresh samples.

Tolerance, from float32 rounding: the fast paths reorder sums (per group, per chunk, per packed
row), which moves each gradient entry by a few float32 ulps of the values summed into it
(eps = 1.2e-7); over these models, layouts and heads we measured at most 2.8e-7 of the largest
entry. The test allows 1e-5 of the largest entry: about 35x the rounding, and 100x smaller than a
0.1% error in any path (a deliberate 1e-3 change of the output layer's backward fails it; see
`test_a_perturbed_backward_is_caught`).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from softpo import logprobs
from softpo.collate import TokenizedExample, collate
from softpo.config import Config, TinyModelConfig, validate
from softpo.losses import KL_ESTIMATORS, LOSSES, ListLogps, SampleLogps
from softpo.models import build_tiny_model, byte_tokenizer
from softpo.trainer import StepStats, Trainer

RTOL = 1e-5  # of the largest gradient entry (module docstring)


def _examples(tokenizer) -> list[TokenizedExample]:
    """Pairs of very different lengths, so that the rows split into several length groups."""
    texts = [("Q: 1+1?", "2", "three"), ("Q: name a colour.", "red", "a very long answer " * 4),
             ("Q: hi", "hello there, how are you today?", "hey"),
             ("Q: which is larger, 34 or 73? think step by step", "73", "34 is larger")]
    out = []
    for row, (prompt, chosen, rejected) in enumerate(texts):
        p = tokenizer(prompt, add_special_tokens=False).input_ids
        resp = [tokenizer(t, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
                for t in (chosen, rejected)]
        out.append(TokenizedExample(p, resp, "pairs", "test", row + 1, prompt))
    return out


def _lab_world():
    from softpo.lab import seqmodel

    space = seqmodel.make_space("abc", 3)
    tokenizer = seqmodel.make_tokenizer("abc")
    rows = [[0, 5], [13, 1], [39, 2], [4, 30], [7, 8], [0, 39]]  # indices into Y, best first
    return tokenizer, seqmodel.build_model(tokenizer, 0, 2, 32, 2), \
        [seqmodel.example(space, r, "pairs", i + 1) for i, r in enumerate(rows)]


def _tiny(arch: str, tied: bool):
    tokenizer = byte_tokenizer()
    model = build_tiny_model(TinyModelConfig(n_layer=2, n_embd=32, n_head=2, n_positions=256,
                                             architecture=arch), tokenizer, seed=0)
    if not tied:  # an output layer of its own (as in Llama-2/3, Mistral, Qwen-7B)
        model.config.tie_word_embeddings = False
        head = model.get_output_embeddings()
        head.weight = nn.Parameter(head.weight.detach().clone() + 0.02 * torch.randn_like(head.weight))
    return tokenizer, model, _examples(tokenizer)


def _config(tmp_path, loss: str, estimator: str, packing: str, full_logits: bool = False) -> Config:
    c = Config()
    c.model.full_logits = full_logits
    c.loss.name, c.loss.alpha, c.loss.beta = loss, 0.7, 0.3
    c.regularizer.estimator, c.regularizer.prompts_per_step = estimator, 2
    c.regularizer.samples_per_prompt, c.regularizer.max_new_tokens = 3, 6
    c.model.packing = packing
    c.train.output_dir, c.train.report_to, c.train.progress = str(tmp_path), [], False
    c.train.batch_size = 4
    validate(c)
    return c


def _trainer(tmp_path, world, loss="spo", estimator="token", packing="none",
             full_logits: bool = False) -> Trainer:
    tokenizer, model, examples = world
    with torch.no_grad():  # away from the reference, so that the regulariser has a gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    t = Trainer(_config(tmp_path, loss, estimator, packing, full_logits), tokenizer=tokenizer,
                model=model, examples=examples)
    if t.spec.is_spo and t.cfg.loss.beta > 0:
        t.refresh_samples(0)
    return t


def _plain_token_logps(model, input_ids, attention_mask, response_mask):
    """(R, T-1) log-probs of the next tokens from the full logits, and the full log-softmax."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    logp_all = logits.log_softmax(-1)
    tok = logp_all.gather(-1, input_ids[:, 1:, None])[..., 0] * response_mask[:, 1:]
    return tok, logp_all


def plain_step_loss(t: Trainer, batch) -> torch.Tensor:
    """The step's objective computed the plain way (module docstring)."""
    model = t.acc.unwrap_model(t.scorer).model
    tok, _ = _plain_token_logps(model, batch.input_ids, batch.attention_mask, batch.response_mask)
    B, n = batch.response_valid.shape
    ref = None
    if t.spec.needs_ref:
        with torch.no_grad(), t.reference.disabled():
            ref_tok, _ = _plain_token_logps(t.reference.model, batch.input_ids,
                                            batch.attention_mask, batch.response_mask)
        ref = ref_tok.sum(-1).view(B, n)
    lp = ListLogps(tok.sum(-1).view(B, n), batch.response_lengths.float(), batch.response_valid,
                   ref)
    loss = t.spec.fn(lp, t.params).losses.sum() / B
    if t.reg is None:
        return loss
    s = t.reg.samples.rows
    mask = s.response_mask[:, 1:].float()
    tok, logp_all = _plain_token_logps(model, s.input_ids, s.attention_mask, s.response_mask)
    with torch.no_grad(), t.reference.disabled():
        ref_tok, ref_all = _plain_token_logps(t.reference.model, s.input_ids, s.attention_mask,
                                              s.response_mask)
    kl = (logp_all.exp() * (logp_all - ref_all)).sum(-1) * mask
    shape = (t.reg.samples.num_prompts, t.reg.samples.samples_per_prompt, -1)
    sl = SampleLogps(tok.view(shape), ref_tok.view(shape), mask.view(shape), kl.view(shape))
    return loss + t.cfg.loss.beta * KL_ESTIMATORS[t.cfg.regularizer.estimator](sl).surrogate.mean()


def _grads(t: Trainer, loss: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in t.scorer.parameters() if p.requires_grad]
    return [torch.zeros_like(p) if g is None else g
            for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True))]


def step_gradients(t: Trainer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(the trainer's step gradient, the plain one) on the trainer's first batch."""
    batch = collate(t.train_set[:t.cfg.train.batch_size], t.tokenizer.pad_token_id).to(t.acc.device)
    with_samples = t.reg is not None
    got = _grads(t, t.forward_loss(batch, with_samples, StepStats(), 1 / batch.batch_size))
    want = _grads(t, plain_step_loss(t, batch))
    return got, want


def assert_equal_to_rounding(got, want) -> float:
    scale = max(float(w.abs().max()) for w in want)
    assert scale > 0
    worst = max(float((g - w).abs().max()) for g, w in zip(got, want)) / scale
    assert worst <= RTOL, f"gradient differs by {worst:.2e} of its largest entry (allowed {RTOL})"
    return worst


WORLDS = {"llama-tied": lambda: _tiny("llama", True), "llama-untied": lambda: _tiny("llama", False),
          "gpt2-tied": lambda: _tiny("gpt2", True), "gpt2-untied": lambda: _tiny("gpt2", False),
          "lab": _lab_world}


@pytest.mark.parametrize("packing", ["none", "padding_free", "shared_prompt"])
@pytest.mark.parametrize("world", sorted(WORLDS))
def test_step_gradient_equals_plain_autograd(tmp_path, world, packing):
    """SPO + global KL (token estimator): the layout's length groups are in play (asserted)."""
    t = _trainer(tmp_path, WORLDS[world](), packing=packing)
    batch = collate(t.train_set[:4], t.tokenizer.pad_token_id).to(t.acc.device)
    lengths = logprobs.row_lengths(batch.attention_mask).tolist()
    if packing == "none":
        assert len(logprobs.length_groups(lengths)) > 1, "the batch must split into length groups"
    got, want = step_gradients(t)
    assert_equal_to_rounding(got, want)


@pytest.mark.parametrize("world", ["llama-tied", "gpt2-untied", "lab"])
def test_one_padded_block_equals_plain_autograd(tmp_path, world, monkeypatch):
    """Length groups off (`LENGTH_BUCKETS = 1`): the one-block path, for every estimator."""
    monkeypatch.setattr(logprobs, "LENGTH_BUCKETS", 1)
    for estimator in ("token", "seq", "token_sf"):
        t = _trainer(tmp_path / estimator, WORLDS[world](), estimator=estimator)
        assert_equal_to_rounding(*step_gradients(t))


@pytest.mark.parametrize("loss", ["dpo", "simpo", "spo_ranked"])
def test_other_losses_equal_plain_autograd(tmp_path, loss):
    world = _tiny("llama", False)
    if loss == "spo_ranked":  # ranked lists of 3 with a padded (missing) response
        tokenizer, model, examples = world
        examples = [TokenizedExample(e.prompt_ids, e.response_ids + [e.response_ids[0][:2]]
                                     if i % 2 else e.response_ids, "ranked", e.source, e.row,
                                     e.prompt_text) for i, e in enumerate(examples)]
        world = (tokenizer, model, examples)
    t = _trainer(tmp_path, world, loss=loss, packing="shared_prompt")
    assert_equal_to_rounding(*step_gradients(t))


@pytest.mark.parametrize("loss", ["spo", "dpo"])
def test_full_logits_equal_plain_autograd(tmp_path, loss, full_logits_calls):
    """`model.full_logits`: the rows (the policy's, and the reference's for DPO) go through the
    whole logits of one padded block, and the step's gradient is still the plain one."""
    t = _trainer(tmp_path, _tiny("llama", False), loss=loss, full_logits=True)
    got, want = step_gradients(t)
    # the policy's rows (and the reference's)
    assert len(full_logits_calls) == (2 if loss == "dpo" else 1)
    assert_equal_to_rounding(got, want)


def test_a_perturbed_backward_is_caught(tmp_path, monkeypatch):
    """The tolerance is tight enough to see a 0.1% error in the output layer's backward."""
    world = WORLDS["llama-untied"]()
    original = logprobs._LabelLogSoftmax.backward

    def off_by_a_thousandth(ctx, grad):
        d_h, d_w, d_b, _ = original(ctx, grad)
        return d_h * 1.001, d_w, d_b, None

    monkeypatch.setattr(logprobs._LabelLogSoftmax, "backward", staticmethod(off_by_a_thousandth))
    t = _trainer(tmp_path, world)
    with pytest.raises(AssertionError, match="gradient differs"):
        assert_equal_to_rounding(*step_gradients(t))

