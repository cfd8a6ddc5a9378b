"""Numbers only: preference accuracy, margins, KL to the reference, entropy, diversity, expert reward.

No logging backends here; callers decide where numbers go.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from softpo.logprobs import DEFAULT_CHUNK, Reference, Rows, score_tokens, token_logps
from softpo.packing import PackedRows
from softpo.sampling import SampleBatch, sample


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct word n-grams over all n-grams of the texts (0 when there are none)."""
    grams, total = set(), 0
    for text in texts:
        words = text.split()
        for i in range(len(words) - n + 1):
            grams.add(tuple(words[i:i + n]))
            total += 1
    return len(grams) / total if total else 0.0


@dataclass
class SampleMetrics:
    kl: float  # Monte Carlo estimate of KL(pi || ref), nats per sequence: mean of log pi - log ref
    entropy: float  # Monte Carlo estimate of sequence entropy: mean of -log pi(y|x)
    length: float  # mean response tokens
    distinct_1: float
    distinct_2: float
    reward: float | None = None  # mean expert reward
    success: float | None = None  # fraction with reward >= success threshold

    def as_dict(self, prefix: str = "") -> dict[str, float]:
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
    from softpo.packing import pack, packable_style

    if pad_token_id is None or batch.samples_per_prompt < 2:
        return None
    try:
        style = packable_style(model)
    except ValueError:
        return None
    rows = batch.rows
    valid = torch.ones(batch.num_prompts, batch.samples_per_prompt, dtype=torch.bool)
    return pack(rows.input_ids, rows.response_mask, valid, pad_token_id, style)  # a row per prompt


@torch.no_grad()
def evaluate_samples(model, tokenizer, prompts: list, data_cfg, reference: Reference | None, k: int,
                     max_new_tokens: int, seed: int, batch_size: int = 16,
                     reward_fn: Callable[[object, str], float] | None = None,
                     success_threshold: float = 1.0, progress=None) -> tuple[SampleMetrics, list]:
    """Sample k responses per prompt (rendered exactly as training renders prompts) and measure
    them. Returns the metrics and one (prompt, response, reward) record per sample."""
    from softpo.collate import prompt_batch

    pol, ref, lengths, texts, owners = [], [], [], [], []
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        ids, mask = prompt_batch(prompts[start:start + batch_size], tokenizer, data_cfg)
        batch = sample(model, tokenizer, ids.to(device), mask.to(device), k, max_new_tokens,
                       seed + start)
        p, r = score_samples(model, reference, batch, tokenizer.pad_token_id)
        pol.append(p)
        ref.append(r)
        lengths.append(batch.response_lengths.float())
        texts += batch.texts(tokenizer)
        owners += [start + i // k for i in range(len(batch.response_lengths))]
        if progress is not None:
            progress.update(ids.shape[0])
    pol_t, ref_t = torch.cat(pol), torch.cat(ref)
    rewards = None if reward_fn is None else \
        [float(reward_fn(prompts[o], t)) for o, t in zip(owners, texts)]
    metrics = SampleMetrics(
        kl=float((pol_t - ref_t).mean()) if reference is not None else float("nan"),
        entropy=float(-pol_t.mean()), length=float(torch.cat(lengths).mean()),
        distinct_1=distinct_n(texts, 1), distinct_2=distinct_n(texts, 2),
        reward=None if rewards is None else sum(rewards) / len(rewards),
        success=None if rewards is None else
        sum(r >= success_threshold for r in rewards) / len(rewards))
    records = [(prompts[o], t, None if rewards is None else rewards[i])
               for i, (o, t) in enumerate(zip(owners, texts))]
    return metrics, records


@torch.no_grad()
def preference_accuracy(model, batches, reference: Reference | None = None) -> dict[str, float]:
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


# ---------------------------------------------------------------- `softpo eval`

def eval_arguments(p) -> None:
    p.add_argument("model", help="trained model folder (e.g. runs/x/final), hub name, tiny or default")
    p.add_argument("--data", required=True, help="held-out preference file")
    p.add_argument("--ref", help="reference model (enables implicit-reward accuracy and KL)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-prompt-length", type=int, default=256)
    p.add_argument("--json", action="store_true")


def eval_command(args) -> int:
    from softpo import data
    from softpo.config import DataConfig, ModelConfig
    from softpo.errors import UserError
    from softpo.models import load_model, load_tokenizer

    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    dcfg = DataConfig(train=args.data, max_length=args.max_length,
                      max_prompt_length=args.max_prompt_length)
    mcfg = ModelConfig(name_or_path=args.model)
    tokenizer = load_tokenizer(mcfg)
    model = load_model(mcfg, tokenizer, seed=0).eval()
    reference = None
    if args.ref:
        ref = load_model(ModelConfig(name_or_path=args.ref), tokenizer, seed=0).eval()
        reference = Reference(ref, adapter_toggle=False)
    examples, report = data.load_preferences(args.data, dcfg)
    items = data.tokenize_examples(examples, tokenizer, dcfg, report)
    batches = [data.collate(items[i:i + args.batch_size], tokenizer.pad_token_id)
               for i in range(0, len(items), args.batch_size)]
    result = preference_accuracy(model, batches, reference)
    print(json.dumps(result) if args.json else
          "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return 0
