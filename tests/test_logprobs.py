"""Chunked, checkpointed output layer (softpo/logprobs.py) against the plain full log-softmax."""

import torch
from torch import nn

from softpo import logprobs
from softpo.logprobs import ResponseStates, chunk_positions, label_logps, token_kl_and_logps
from softpo.losses import exact_token_kl


def test_chunk_positions_respects_the_logit_budget(monkeypatch):
    monkeypatch.setattr(logprobs, "LOGIT_BUDGET", 1 << 24)
    assert chunk_positions(1024, 50257) == 333  # GPT-2's vocabulary
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
