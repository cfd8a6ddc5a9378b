"""Numbers only: preference accuracy, margins, KL to the reference, entropy, diversity (distinct-n,
self-similarity), pass@k, expert reward.

No logging backends here; callers decide where numbers go. Sampled evaluations encode their prompts
with the one prompt encoder training uses (`softpo.sampling.sample_prompts`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from softpo.collate import PreferenceBatch
from softpo.config import DataConfig
from softpo.logprobs import DEFAULT_CHUNK, Reference, score_tokens, token_logps
from softpo.packing import PackedRows, Rows, pack, packable_style
from softpo.sampling import SampleBatch, sample_prompts


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct word n-grams over all n-grams of the texts (0 when there are none)."""
    grams, total = set(), 0
    for text in texts:
        words = text.split()
        for i in range(len(words) - n + 1):
            grams.add(tuple(words[i:i + n]))
            total += 1
    return len(grams) / total if total else 0.0


def answer_key(text: str) -> str:
    """A response as an answer: whitespace collapsed, one trailing period dropped, case folded
    ("July.", " july" and "July" are one answer)."""
    text = " ".join(text.split())
    return (text[:-1] if text.endswith(".") else text).casefold()


def distinct_successes(texts: list[str], successes: list[bool]) -> int:
    """How many different answers (`answer_key`) the successful samples among `texts` give: of
    k samples of a prompt with several right answers, 1 when the model repeats one right answer,
    up to k when every success is another one."""
    return len({answer_key(t) for t, ok in zip(texts, successes) if ok})


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples of which c succeeded (Chen et al., 2021):

        pass@k = 1 - C(n - c, k) / C(n, k),

    the probability that k samples drawn without replacement from the n include a success
    (1 when fewer than k samples failed). Needs 1 <= k <= n."""
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b|; two empty sets are identical (1)."""
    return len(a & b) / len(a | b) if a or b else 1.0


def self_similarity(texts: list[str]) -> float:
    """Mean pairwise Jaccard similarity of the word sets (whitespace-split) of some samples, over
    the k(k-1)/2 pairs: 1 when all samples use the same words, 0 when no two share a word.
    NaN for fewer than two samples."""
    words = [set(t.split()) for t in texts]
    pairs = [jaccard(a, b) for i, a in enumerate(words) for b in words[i + 1:]]
    return sum(pairs) / len(pairs) if pairs else float("nan")


@dataclass
class SampleMetrics:
    """What sampled responses to held-out prompts measure (Monte Carlo, nats per sequence)."""

    kl: float  # Monte Carlo estimate of KL(pi || ref), nats per sequence: mean of log pi - log ref
    entropy: float  # Monte Carlo estimate of sequence entropy: mean of -log pi(y|x)
    length: float  # mean response tokens
    distinct_1: float
    distinct_2: float
    reward: float | None = None  # mean expert reward
    success: float | None = None  # fraction with reward >= success threshold

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """The measured numbers, keys prefixed; reward and success only with an expert."""
        return {f"{prefix}{k}": v for k, v in self.__dict__.items() if v is not None}


@torch.no_grad()
def score_samples(model, reference: Reference | None, batch: SampleBatch,
                  pad_token_id: int | None = None) -> tuple[Tensor, Tensor]:
    """Sequence log-probs of sampled responses under the policy and the reference.  (S,), (S,).

    With `pad_token_id` and a model that takes a 4-D mask, each prompt's k samples are scored in one
    packed row (softpo/packing.py): the prompt runs once instead of k times."""
    packed = _packed_samples(model, batch, pad_token_id)
    if packed is None:
        rows = batch.rows
        policy = token_logps(model, rows.input_ids, rows.attention_mask, rows.response_mask).sum(-1)
        ref = reference.token_logps(rows).sum(-1) if reference is not None else None
    else:
        policy = score_tokens(model, packed, DEFAULT_CHUNK).sum(-1)
        ref = reference.sequence_logps(packed) if reference is not None else None
    return policy, ref if ref is not None else torch.zeros_like(policy)


def _packed_samples(model, batch: SampleBatch, pad_token_id: int | None) -> PackedRows | None:
    if pad_token_id is None or batch.samples_per_prompt < 2:
        return None
    try:
        style = packable_style(model)
    except ValueError:
        return None
    rows = batch.rows
    valid = torch.ones(batch.num_prompts, batch.samples_per_prompt, dtype=torch.bool)
    return pack(rows.input_ids, rows.response_mask, valid, pad_token_id, style)  # a row per prompt


@dataclass
class DrawnSamples:
    """k samples for each of P prompts, flattened prompt-major (S = P*k), with their log-probs."""

    owners: list[int]  # (S,) index of each sample's prompt
    texts: list[str]  # (S,) decoded responses, special tokens skipped
    lengths: Tensor  # (S,) response tokens (EOS included when reached)
    finished: Tensor  # (S,) bool: ended with EOS before max_new_tokens
    policy_logps: Tensor  # (S,) log pi(y|x), nats per sequence
    ref_logps: Tensor | None  # (S,) log pi_ref(y|x); None without a reference


@torch.no_grad()
def draw_samples(model, tokenizer, prompts: list, data_cfg: DataConfig,
                 reference: Reference | None, k: int, max_new_tokens: int, seed: int,
                 batch_size: int = 16, temperature: float = 1.0, progress=None) -> DrawnSamples:
    """Sample k responses per prompt, `batch_size` prompts at a time (the chunk starting at prompt
    `start` with seed `seed + start`), and score them under the policy and the reference."""
    pol, ref, lengths, finished, texts, owners = [], [], [], [], [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        batch = sample_prompts(model, tokenizer, chunk, data_cfg, k, max_new_tokens, seed + start,
                               temperature=temperature)
        p, r = score_samples(model, reference, batch, tokenizer.pad_token_id)
        pol.append(p.float().cpu())
        ref.append(r.float().cpu())
        lengths.append(batch.response_lengths.cpu())
        finished.append(batch.finished.cpu())
        texts += batch.texts(tokenizer)
        owners += [start + i // k for i in range(len(batch.response_lengths))]
        if progress is not None:
            progress.update(len(chunk))
    return DrawnSamples(owners, texts, torch.cat(lengths), torch.cat(finished), torch.cat(pol),
                        torch.cat(ref) if reference is not None else None)


@torch.no_grad()
def evaluate_samples(model, tokenizer, prompts: list, data_cfg: DataConfig,
                     reference: Reference | None, k: int,
                     max_new_tokens: int, seed: int, batch_size: int = 16,
                     reward_fn: Callable[[object, str], float] | None = None,
                     success_threshold: float = 1.0, progress=None) -> tuple[SampleMetrics, list]:
    """Sample k responses per prompt (rendered exactly as training renders prompts) and measure
    them. Returns the metrics and one (prompt, response, reward) record per sample."""
    drawn = draw_samples(model, tokenizer, prompts, data_cfg, reference, k, max_new_tokens, seed,
                         batch_size, progress=progress)
    owners, texts, pol_t = drawn.owners, drawn.texts, drawn.policy_logps
    rewards = None if reward_fn is None else \
        [float(reward_fn(prompts[o], t)) for o, t in zip(owners, texts)]
    metrics = SampleMetrics(
        kl=float((pol_t - drawn.ref_logps).mean()) if reference is not None else float("nan"),
        entropy=float(-pol_t.mean()), length=float(drawn.lengths.float().mean()),
        distinct_1=distinct_n(texts, 1), distinct_2=distinct_n(texts, 2),
        reward=None if rewards is None else sum(rewards) / len(rewards),
        success=None if rewards is None else
        sum(r >= success_threshold for r in rewards) / len(rewards))
    records = [(prompts[o], t, None if rewards is None else rewards[i])
               for i, (o, t) in enumerate(zip(owners, texts))]
    return metrics, records


@torch.no_grad()
def preference_accuracy(model, batches: list[PreferenceBatch],
                        reference: Reference | None = None) -> dict[str, float]:
    """Fraction of examples whose most-preferred response has the highest policy log-prob (and, with
    a reference, the highest log-ratio: DPO's implicit reward)."""
    hits = ratio_hits = total = 0
    margin = 0.0
    for batch in batches:
        rows = Rows(batch.input_ids, batch.attention_mask, batch.response_mask)
        B, n = batch.response_valid.shape
        lp = token_logps(model, rows.input_ids, rows.attention_mask, rows.response_mask).sum(-1)
        lp = lp.view(B, n).masked_fill(~batch.response_valid, float("-inf"))
        hits += int((lp[:, 0] > lp[:, 1:].max(-1).values).sum())
        margin += float((lp[:, 0] - lp[:, 1:].max(-1).values).sum())
        if reference is not None:
            ratio = lp - reference.sequence_logps(rows).view(B, n)
            ratio_hits += int((ratio[:, 0] > ratio[:, 1:].max(-1).values).sum())
        total += B
    out = {"accuracy": hits / max(total, 1), "margin": margin / max(total, 1), "examples": total}
    if reference is not None:
        out["implicit_reward_accuracy"] = ratio_hits / max(total, 1)
    return out
