"""The sequence lab's world: a tiny causal LM whose whole response distribution is enumerable.

Responses
---------
An alphabet of L letters (default `abc`) and one special token `<eos>`: L + 1 token ids, `<eos>`
also being BOS and pad, so every next-token distribution is over exactly the letters and `<eos>`.
The prompt is the single token `<eos>`. A response is a string y of 0..M letters (M = `max_len`):
fewer than M letters end with `<eos>`, M letters end at the length cap without it. That is exactly
what `generate()` returns with `max_new_tokens = M` (`softpo.sampling`): it stops at the first
`<eos>` or after M tokens. So Y = A^{<=M}, |Y| = sum_{k<=M} L^k (13 for L = 3, M = 2; 40 for M = 3),
and with p(.|prefix) the model's next-token distributions
    pi(y) = prod_{t<|y|} p(y_t | y_<t) * (p(<eos> | y) if |y| < M else 1),
    sum_{y in Y} pi(y) = 1 exactly:
the mass of a prefix w with |w| < M splits into its `<eos>` outcome and its L one-letter extensions,
and a prefix of length M is an outcome; unrolling from the empty prefix (mass 1) covers Y once.
log pi(y) is the summed response log-prob that training uses (`softpo.logprobs`), so every |Y|
sequence is scored in one batched forward and the model's distribution is known exactly.

World
-----
Seeded from one integer: an expert reward r(y) = reward_scale * N(0, 1) and a known supervised
distribution p_sft = softmax(ref_scale * N(0, 1)) over Y (independent draws, Y in shortlex order).
The reference model is the tiny LM fitted to p_sft by exact maximum likelihood: full-batch Adam on
the cross-entropy -sum_y p_sft(y) log pi_theta(y) over all of Y, minimal at pi_theta = p_sft.
Everything downstream uses the reference model's own exact distribution, not p_sft.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product

import torch
from torch import Tensor

from softpo.collate import TokenizedExample, collate
from softpo.config import TinyModelConfig
from softpo.logprobs import sequence_logps

EOS = "<eos>"
DTYPE = torch.float64


# ---------------------------------------------------------------- tokenizer and responses

def make_tokenizer(letters: str = "abc"):
    """A `PreTrainedTokenizerFast` over the letters (ids 0..L-1) and `<eos>` (id L) only."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(letters)} | {EOS: len(letters)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(EOS, special=True, normalized=False)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS,
                                   pad_token=EOS, clean_up_tokenization_spaces=False,
                                   model_max_length=64)


@dataclass(frozen=True)
class Space:
    """Every response in shortlex order with its token ids (as training and generate() see them)."""

    letters: str
    max_len: int
    strings: tuple[str, ...]  # (Y,) "", "a", "b", ..., "ccc"
    ids: tuple[tuple[int, ...], ...]  # (Y,) response token ids, <eos> appended below the cap

    @property
    def eos_id(self) -> int:
        """The id of <eos> (after the letters)."""
        return len(self.letters)

    @property
    def size(self) -> int:
        """|Y|, the number of responses."""
        return len(self.strings)

    def lengths(self) -> Tensor:  # (Y,) response tokens, <eos> included
        """Tokens of each response, <eos> included."""
        return torch.tensor([len(i) for i in self.ids], dtype=DTYPE)

    def index(self, ids: list[int]) -> int:
        """The response that generated token ids (up to and including the first <eos>) spell."""
        letters = ids[:ids.index(self.eos_id)] if self.eos_id in ids else ids
        return self.strings.index("".join(self.letters[i] for i in letters))


def make_space(letters: str = "abc", max_len: int = 3) -> Space:
    """Every response of at most `max_len` letters, in shortlex order."""
    strings = tuple("".join(w) for k in range(max_len + 1) for w in product(letters, repeat=k))
    eos = len(letters)
    ids = tuple(tuple(letters.index(ch) for ch in s) + ((eos,) if len(s) < max_len else ())
                for s in strings)
    return Space(letters, max_len, strings, ids)


def example(space: Space, responses: list[int], kind: str, row: int) -> TokenizedExample:
    """One preference example (responses are indices into Y, in preference order)."""
    return TokenizedExample([space.eos_id], [list(space.ids[j]) for j in responses], kind, "lab",
                            row, EOS)


# ---------------------------------------------------------------- the model and its distribution

def build_model(tokenizer, seed: int, n_layer: int = 2, n_embd: int = 64, n_head: int = 4):
    """A LlamaForCausalLM over the lab's 4-token vocabulary (softpo's tiny-model builder).

    `<eos>` is also the pad token, so the Hugging Face embedding is built with `padding_idx` =
    `<eos>`, which drops the gradient of that row's *input* use. Here `<eos>` is the prompt of every
    response, so the prompt's representation could then only move through the tied output layer;
    measured, that leaves the reference fit on plateaus (seed 0: KL(p_sft || pi_ref) 0.062 nats
    after 300 steps, 4.9e-2 after 1000 on |Y| = 40) that the full parameterisation does not have.
    The lab's model therefore trains every embedding row (no padding is ever scored)."""
    from softpo.models import build_tiny_model

    shape = TinyModelConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=32)
    model = build_tiny_model(shape, tokenizer, seed)
    model.get_input_embeddings().padding_idx = None
    return model


class Scorer:
    """Scores every response of Y in one batched forward: the model's exact distribution."""

    def __init__(self, space: Space):
        batch = collate([example(space, list(range(space.size)), "ranked", 0)], space.eos_id)
        self.rows = (batch.input_ids, batch.attention_mask, batch.response_mask)  # (Y, T) each

    def logps(self, model) -> Tensor:
        """log pi(y) for every y in Y, (Y,) float32, differentiable, on the model's device."""
        device = next(model.parameters()).device
        return sequence_logps(model, *(r.to(device) for r in self.rows))

    @torch.no_grad()
    def exact(self, model) -> Tensor:
        """log pi(y), (Y,) float64 on the CPU (where the world's tensors are), renormalised (the
        float32 sum is 1 to ~1e-6)."""
        was_training = model.training
        model.eval()
        logps = self.logps(model).to("cpu", DTYPE)
        model.train(was_training)
        return logps - logps.logsumexp(0)


# ---------------------------------------------------------------- the world

@dataclass(frozen=True)
class World:
    """A world: responses, expert rewards and the distribution the reference is fitted to."""

    space: Space
    rewards: Tensor  # (Y,) expert reward r(y)
    sft_logps: Tensor  # (Y,) the known distribution the reference is fitted to


def make_world(space: Space, seed: int, reward_scale: float = 1.0, ref_scale: float = 1.0) -> World:
    """Rewards and the reference's target distribution, drawn from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    rewards = reward_scale * torch.randn(space.size, generator=gen, dtype=DTYPE)
    sft = torch.log_softmax(ref_scale * torch.randn(space.size, generator=gen, dtype=DTYPE), 0)
    return World(space, rewards, sft)


def fit_reference(model, scorer: Scorer, target_logps: Tensor, steps: int = 300,
                  lr: float = 1e-2) -> float:
    """Exact maximum likelihood: full-batch Adam on -sum_y p(y) log pi_theta(y), cosine schedule.

    Returns KL(p || pi_theta) in nats at the end (the cross-entropy minus H(p)).
    """
    p = target_logps.exp().float()  # (Y,)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    cosine = lambda t: 0.5 * (1 + math.cos(math.pi * t / steps))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    model.train()
    for _ in range(steps):
        logps = scorer.logps(model)
        loss = -(p.to(logps.device) * logps).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return kl(target_logps, scorer.exact(model))


def kl(logps: Tensor, other_logps: Tensor) -> float:
    """KL(p || q) = sum_y p(y) (log p(y) - log q(y)) from normalised log-probs (Y,)."""
    return float((logps.exp() * (logps - other_logps)).sum())


def entropy(logps: Tensor) -> float:
    """H(p) in nats for log-probs over Y."""
    return float(-(logps.exp() * logps).sum())
