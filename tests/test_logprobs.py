"""Chunked, checkpointed output layer (softpo/logprobs.py) against the plain full log-softmax."""

import pytest
import torch
from torch import nn

from softpo import logprobs
from softpo.logprobs import ResponseStates, chunk_positions, label_logps, token_kl_and_logps
from softpo.losses import exact_token_kl


def test_chunk_positions_respects_the_logit_budget(monkeypatch):
    monkeypatch.setattr(logprobs, "LOGIT_BUDGET", 1 << 24)
    assert chunk_positions(1024, 50257) == 333  # GPT-2's vocabulary under a 2^24 budget
    assert chunk_positions(1024, 1000) == 1024  # small vocabulary: the requested chunk
    assert chunk_positions(8, 10 ** 9) == 1  # never zero


def _states(n=23, hidden=6, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, requires_grad=True)
    y = torch.randint(vocab, (n,), generator=g)
    head = nn.Linear(hidden, vocab)
    return ResponseStates(h, y, torch.zeros(n, dtype=torch.long), torch.arange(n)), head


def test_label_logps_with_tiny_chunks_equals_full_log_softmax(monkeypatch):
    states, head = _states()
    monkeypatch.setattr(logprobs, "LOGIT_BUDGET", 3 * head.weight.shape[0])  # 3 positions per chunk
    got = label_logps(states, head, chunk_size=1024)
    want = torch.log_softmax(head(states.hidden), -1).gather(-1, states.labels[:, None])[:, 0]
    torch.testing.assert_close(got, want)
    g_got = torch.autograd.grad(got.square().sum(), [states.hidden, head.weight])
    g_want = torch.autograd.grad(want.square().sum(), [states.hidden, head.weight])
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


def test_token_kl_with_tiny_chunks_equals_unchunked(monkeypatch):
    states, head = _states(seed=1)
    ref_head = nn.Linear(*head.weight.shape[::-1])
    ref_hidden = torch.randn_like(states.hidden)
    monkeypatch.setattr(logprobs, "LOGIT_BUDGET", 2 * head.weight.shape[0])
    kl, lp = token_kl_and_logps(states, ref_hidden, head, ref_head, chunk_size=1024)
    logits = head(states.hidden)
    want_kl = exact_token_kl(logits, ref_head(ref_hidden).detach())
    want_lp = torch.log_softmax(logits, -1).gather(-1, states.labels[:, None])[:, 0]
    torch.testing.assert_close(kl, want_kl)
    torch.testing.assert_close(lp, want_lp)
    g_got = torch.autograd.grad((kl + lp).sum(), states.hidden)[0]
    g_want = torch.autograd.grad((want_kl + want_lp).sum(), states.hidden)[0]
    torch.testing.assert_close(g_got, g_want)


# ------------------------------------------------------------------ length groups


def test_length_groups_by_hand():
    """Rows of 10, 100, 12, 98 tokens: one block is 4 x 100 = 400 positions (+ 8 fixed cost),
    two groups {10, 12} and {98, 100} are 2 x 12 + 2 x 100 = 224 (+ 16), three groups cost more
    (24 + 98 + 100 + 24 = 246): two groups, shortest first."""
    from softpo.logprobs import length_groups

    assert length_groups([10, 100, 12, 98]) == [[0, 2], [3, 1]]
    assert length_groups([10, 100, 12, 98], max_groups=1) == [[0, 2, 3, 1]]
    assert length_groups([50, 50, 50]) == [[0, 1, 2]]  # nothing to save: one block
    assert length_groups([7]) == [[0]] and length_groups([]) == []


def test_row_lengths_of_right_and_left_padding():
    from softpo.logprobs import row_lengths

    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0], [0, 0, 0, 0, 0]])
    assert row_lengths(mask).tolist() == [3, 5, 4, 1]


def _tiny_llama():
    from softpo.config import TinyModelConfig
    from softpo.models import build_tiny_model, byte_tokenizer

    tok = byte_tokenizer()
    return build_tiny_model(TinyModelConfig(n_layer=2, n_embd=32, n_head=2), tok, seed=0,
                            attn_implementation="sdpa"), tok


def test_grouped_rows_give_the_states_and_gradients_of_one_block(monkeypatch):
    """Rows of 3..40 tokens: run in length groups they give the one-block states and gradients."""
    from softpo.logprobs import length_groups, score_tokens
    from softpo.packing import Rows

    model, tok = _tiny_llama()
    lengths = [3, 40, 5, 38, 21]
    T = max(lengths)
    ids = torch.randint(3, 200, (len(lengths), T))
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids[mask == 0] = tok.pad_token_id
    response = mask.bool() & (torch.arange(T) >= 2)
    assert len(length_groups(lengths)) > 1  # the grouped path really runs
    results = []
    for buckets in (logprobs.LENGTH_BUCKETS, 1):
        monkeypatch.setattr(logprobs, "LENGTH_BUCKETS", buckets)
        calls = []
        monkeypatch.setattr(logprobs, "length_groups",
                            lambda *a, _f=length_groups: calls.append(_f(*a)) or calls[-1])
        lp = score_tokens(model, Rows(ids, mask, response), 1024)
        grads = torch.autograd.grad(lp.sum(), list(model.parameters()))
        results.append((lp.detach(), grads))
        assert (len(calls[-1]) > 1) == (buckets > 1)
    (grouped, g_grouped), (block, g_block) = results
    torch.testing.assert_close(grouped, block, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_grouped, g_block):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
    assert (grouped[response] != 0).all() and (grouped[~response] == 0).all()


def test_label_log_softmax_function_with_bias_and_under_autocast():
    """The custom backward against autograd on the plain formula: with a bias, with only some
    inputs needing gradient, and under bf16 autocast (matmuls in bf16 both ways)."""
    from softpo.logprobs import _label_logps, _LabelLogSoftmax

    torch.manual_seed(3)
    h = torch.randn(7, 16, requires_grad=True)
    head = nn.Linear(16, 50)
    y = torch.randint(0, 50, (7,))
    g = torch.randn(7)
    got = _LabelLogSoftmax.apply(h, head.weight, head.bias, y)
    want = _label_logps(h, head.weight, head.bias, y)
    torch.testing.assert_close(got, want)
    params = [h, head.weight, head.bias]
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g)):
        torch.testing.assert_close(a, b)
    head.weight.requires_grad_(False)  # LoRA: a frozen head gets no gradient, h still does
    got = _LabelLogSoftmax.apply(h, head.weight, None, y)
    (d_h,) = torch.autograd.grad(got, [h], g)
    torch.testing.assert_close(d_h, torch.autograd.grad(_label_logps(h, head.weight, None, y),
                                                        [h], g)[0])
    head.weight.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _LabelLogSoftmax.apply(h, head.weight, head.bias, y)
        want = _label_logps(h, head.weight, head.bias, y)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-2, atol=2e-2)  # bf16 rounding, bias order
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_length_groups_on_many_rows_use_coarse_cuts_and_cover_every_row():
    """Past `max_cuts` rows the split points are coarse: every row is still in exactly one group,
    groups are sorted by length, and the padded positions are no worse than one block."""
    import random

    from softpo.logprobs import length_groups

    rng = random.Random(0)
    lengths = [rng.randint(50, 2000) for _ in range(1000)]
    groups = length_groups(lengths, 4, max_cuts=64)
    assert sorted(i for g in groups for i in g) == list(range(1000))
    tops = [max(lengths[i] for i in g) for g in groups]
    assert tops == sorted(tops) and 1 < len(groups) <= 4
    assert sum(len(g) * t for g, t in zip(groups, tops)) < 1000 * max(lengths)
    exact, coarse = length_groups(lengths[:200], 4), length_groups(lengths[:200], 4, max_cuts=200)
    assert exact == coarse  # with max_cuts >= rows the search is the exact one


# ------------------------------------------------------------------ the regulariser's samples


def _sampled(arch: str, attn: str = "sdpa"):
    """A tiny model, a perturbed copy as the policy, and k = 3 samples for each of 2 prompts."""
    from tiny_samples import perturbed_samples

    policy, ref, _, batch = perturbed_samples(arch, attn, ["a question?", "hi"], 3, 7, seed=2)
    return policy, ref, batch.rows


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("gpt2", "eager")])
def test_sample_states_share_prompts_and_equal_the_padded_states(arch, attn):
    """`sample_states` runs each prompt once for its samples (packed) and gives the padded rows'
    states, in their order and on their grid, with their gradients."""
    from softpo import packing

    policy, _, rows = _sampled(arch, attn)
    assert packing.share_prompts(rows, packing.mask_style(policy), 32) is not None
    got = logprobs.sample_states(policy, rows)
    want = logprobs.response_states(policy, rows.input_ids, rows.attention_mask, rows.response_mask)
    for name in ("rows", "cols", "labels"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    torch.testing.assert_close(got.hidden, want.hidden, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(want.hidden)
    params = list(policy.parameters())
    g_got = torch.autograd.grad((got.hidden * w).sum(), params)
    g_want = torch.autograd.grad((want.hidden * w).sum(), params)
    scale = max(float(b.abs().max()) for b in g_want)  # float rounding: 1e-5 of the largest entry
    assert max(float((a - b).abs().max()) for a, b in zip(g_got, g_want)) <= 1e-5 * scale


@pytest.mark.parametrize("budget_positions", [1024, 3])  # one chunk (log-probs kept), chunks of 3
def test_token_kl_with_the_reference_log_probs_given_equals_unchunked(monkeypatch,
                                                                      budget_positions):
    """The reference given as its full log-probs (V, N) instead of states and output layer: the same
    KL, label log-probs and gradients (hidden states, output weight and bias), whether the policy's
    log-probs are kept for backward (one chunk) or recomputed (several)."""
    states, head = _states(seed=2)
    ref_head = nn.Linear(*head.weight.shape[::-1])
    ref_hidden = torch.randn_like(states.hidden)
    monkeypatch.setattr(logprobs, "LOGIT_BUDGET", budget_positions * head.weight.shape[0])
    ref_logp = logprobs.head_log_probs(ref_head, ref_hidden)  # (V, N)
    assert ref_logp.shape == (head.weight.shape[0], len(states.labels))
    kl, lp = token_kl_and_logps(states, None, head, None, chunk_size=1024, ref_logp=ref_logp)
    logits = head(states.hidden)
    want_kl = exact_token_kl(logits, ref_head(ref_hidden).detach())
    want_lp = torch.log_softmax(logits, -1).gather(-1, states.labels[:, None])[:, 0]
    torch.testing.assert_close(kl, want_kl)
    torch.testing.assert_close(lp, want_lp)
    weights = torch.randn(2, len(kl))  # any combination of the two outputs
    wrt = [states.hidden, head.weight, head.bias]
    g_got = torch.autograd.grad((weights[0] * kl + weights[1] * lp).sum(), wrt)
    g_want = torch.autograd.grad((weights[0] * want_kl + weights[1] * want_lp).sum(), wrt)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


def test_reference_sample_view_keeps_full_log_probs_only_within_one_chunk(monkeypatch):
    """`Reference.sample_view(keep_logps=True)`: the states, the sampled tokens' log-probs (those of
    `token_logps`), and the full log-probs (V, N) when N positions fit one output-layer chunk."""
    _, ref, rows = _sampled("llama")
    reference = logprobs.Reference(ref, adapter_toggle=False)
    hidden, token_lp, full = reference.sample_view(rows, keep_logps=True)
    torch.testing.assert_close(token_lp, reference.token_logps(rows), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden, reference.sample_hidden(rows))
    states = logprobs.response_states(ref, rows.input_ids, rows.attention_mask, rows.response_mask)
    assert full.shape == (ref.config.vocab_size, len(states.labels))
    torch.testing.assert_close(full, torch.log_softmax(ref.lm_head(states.hidden), -1).t().detach(),
                               rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(logprobs, "LOGIT_BUDGET", (len(states.labels) - 1) * full.shape[0])
    assert reference.sample_view(rows, keep_logps=True)[2] is None
    assert reference.sample_view(rows)[2] is None
