"""Exact candidate-set evaluation: the probability of every candidate answer, by teacher forcing.

For a prompt x with candidate responses y_1..y_n (complete responses: each ends its turn) the
model's probability of candidate i as the whole response, at temperature T, is

    p_i = pi_T(y_i | x) = prod_t softmax(z_t / T)[y_i,t],     z_t: the logits before token t,

computed in batched forwards, no sampling. Candidates are tokenised exactly as training tokenises
responses (`softpo.collate.tokenize_example`: string prompts, or conversations through the chat
template, the response ending with the template's end of turn or EOS). With `stop_at_eos` (the
default) a candidate's tokens stop at its first end-of-sequence token, where generate() stops: the
template's text after the end of turn (ChatML's newline after `<|im_end|>`) is not part of a
sampled response, so p_i is exactly the probability that pure sampling at temperature T returns
y_i, and the p_i of distinct candidates sum to at most 1 (`stop_at_eos=False` scores training's
tokens; on SmolLM2-135M-Instruct the newline after `<|im_end|>` has probability >= 0.99). T = 1 runs the scorer training uses
(`softpo.logprobs`); T != 1 divides the output layer's logits by T before the softmax.

Metrics per prompt, from p_i (not renormalised), rewards r_i, a success threshold tau (default:
the row's best reward) and alpha > 0; C = {i : r_i >= tau} are the correct candidates:

    success      = sum_{i in C} p_i                 probability that a sample is a correct candidate
    outside      = 1 - sum_i p_i                    mass on responses that are no candidate
    q            = p_C / sum_{i in C} p_i           the model among the correct candidates
    entropy      = H(q) / log|C|                    normalised entropy (1.0 when |C| = 1)
    kl_uniform   = KL(q || uniform on C) = log|C| - H(q)
    coverage     = |{i in C : q_i >= 0.5 / |C|}| / |C|   share holding half its uniform share
    top_share    = max_i q_i
    kl_expert    = KL(m || e),  m = p / sum_i p_i,  e = softmax(r / alpha)   (over all candidates)
    reward       = sum_i p_i r_i                    expected reward (responses outside count 0)

SPO's optimum is e (softmax(r / alpha)); with 0/1 rewards it is uniform on C, so a model aligned
to the expert distribution has entropy 1, kl_uniform 0 and coverage 1; DPO's optimum
pi_ref * exp(r / beta) keeps pi_ref's skew among equally good answers.

Input rows (`read_candidates`): JSONL/JSON/CSV/Parquet rows `{prompt, candidates, rewards}`:
`prompt` a string or a conversation, `candidates` a list of distinct strings, `rewards` a list of
finite numbers of the same length; without `rewards`, an expert `scorer(prompts, responses)`
(`softpo.tasks.experts`) scores the candidates. A bad row is a one-line `UserError` naming the
file, the row and the field. `task_rows` builds rows from the `choices` task family.

On the command line: `softpo tasks candidates --task choices --out FILE.jsonl` writes such rows,
`softpo eval MODEL --candidates FILE [--temperature T] [--alpha A] [--json]` evaluates them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from softpo.collate import TokenizedExample, collate, pad_token_id, tokenize_example
from softpo.config import DataConfig
from softpo.data import PreferenceExample, Text, _Ctx, _text
from softpo.errors import UserError
from softpo.logprobs import (DEFAULT_CHUNK, ResponseStates, chunk_positions, packed_states,
                             response_states, scatter_rows, score_tokens, token_logps)
from softpo.models import has_plain_head, hf_model
from softpo.packing import PackedRows, Rows, pack, packable_style
from softpo.readers import BadRowError, _type_name, open_source

LAYOUTS = ("padded", "packed")
NO_LIMIT = 1 << 30  # max_length when the model states no context length


@dataclass(frozen=True)
class CandidateRow:
    """One prompt with its candidate responses and their rewards."""

    prompt: Text
    candidates: list[str]
    rewards: list[float]
    source: str = ""
    row: int = 0


@dataclass(frozen=True)
class CandidateScore:
    """One candidate's text, its probability as the whole response, and its reward."""

    text: str
    logp: float  # log p_i
    prob: float  # p_i
    reward: float


@dataclass
class PromptResult:
    """One prompt: its candidates in the row's order and its metrics (module docstring)."""

    prompt: Text
    candidates: list[CandidateScore]
    metrics: dict[str, float]


@dataclass
class CandidateReport:
    """Every prompt's result and the means of the metrics over prompts."""

    results: list[PromptResult]
    summary: dict[str, float]  # the mean of every metric over prompts, and `prompts`

    def as_dict(self) -> dict:
        """JSON-able: the summary, and per prompt its metrics and every candidate's text, log p,
        p and reward, in the row's order."""
        return {"summary": self.summary, "prompts": [
            {"prompt": res.prompt, "metrics": res.metrics,
             "candidates": [{"text": c.text, "logp": c.logp, "prob": c.prob, "reward": c.reward}
                            for c in res.candidates]} for res in self.results]}


# ---------------------------------------------------------------- tokens

def eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """The tokens generate() stops at: the tokenizer's EOS and the model's generation EOS ids."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(getattr(hf_model(model), "generation_config", None), "eos_token_id", None)
    ids.update(gen if isinstance(gen, list) else [gen])
    return {i for i in ids if i is not None}


def _stop(ids: list[int], stops: set[int]) -> list[int]:
    """`ids` up to and including the first stop token."""
    cut = next((k for k, t in enumerate(ids) if t in stops), None)
    return ids if cut is None else ids[:cut + 1]


def context_length(model: nn.Module) -> int:
    """The most tokens the model takes in one sequence (NO_LIMIT when its config does not say)."""
    cfg = hf_model(model).config
    return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
               or NO_LIMIT)


def tokenize_candidates(row: CandidateRow, tokenizer: Any, stops: set[int] | None = None,
                        max_length: int = NO_LIMIT, chat_template: str = "auto"
                        ) -> TokenizedExample:
    """The prompt's ids and each candidate's ids as training renders them; with `stops`, each
    candidate ends at its first stop token. Never truncated: a prompt + candidate of more than
    `max_length` tokens is a UserError naming the row."""
    responses = row.candidates if isinstance(row.prompt, str) else \
        [[{"role": "assistant", "content": c}] for c in row.candidates]
    example = PreferenceExample(row.prompt, responses, row.source, row.row, "ranked")
    cfg = DataConfig(max_length=NO_LIMIT, max_prompt_length=NO_LIMIT, chat_template=chat_template)
    tok = tokenize_example(example, tokenizer, cfg)  # nothing is cut at NO_LIMIT
    if stops:
        tok.response_ids = [_stop(r, stops) for r in tok.response_ids]
    longest = len(tok.prompt_ids) + max(map(len, tok.response_ids))
    if longest > max_length:
        raise UserError(f"prompt + candidate is {longest} tokens, more than the model's "
                        f"{max_length}", source=row.source, row=row.row, field="candidates")
    return tok


def row_batches(sizes: Sequence[int], max_rows: int) -> list[list[int]]:
    """Consecutive prompts grouped so that each group has at most `max_rows` candidate rows when
    padded to its largest prompt (a prompt with more candidates than that gets a group alone)."""
    groups: list[list[int]] = []
    widest = 0
    for i, n in enumerate(sizes):
        if groups and (len(groups[-1]) + 1) * max(widest, n) <= max_rows:
            groups[-1].append(i)
            widest = max(widest, n)
        else:
            groups.append([i])
            widest = n
    return groups


# ---------------------------------------------------------------- log-probs

def _tempered_label_logps(states: ResponseStates, head: nn.Linear, temperature: float,
                          chunk_size: int) -> Tensor:
    """log softmax(head(h) / T)[label] for every state, chunked.  (N,) float32."""
    parts = []
    step = chunk_positions(chunk_size, head.weight.shape[0])
    for start in range(0, states.labels.numel(), step):
        h, y = states.hidden[start:start + step], states.labels[start:start + step]
        logits = head(h).float() / temperature  # (n, V)
        parts.append(logits.gather(-1, y[:, None]).squeeze(-1) - logits.logsumexp(-1))
    return torch.cat(parts) if parts else states.hidden.new_zeros(0, dtype=torch.float32)


def _full_logits_tempered(model: nn.Module, rows: Rows, temperature: float) -> Tensor:
    """For heads that are not a plain Linear: full forward, logits / T, log-softmax.  (R, T)."""
    ids = rows.input_ids  # (R, T)
    logits = model(input_ids=ids, attention_mask=rows.attention_mask, use_cache=False).logits
    logps = torch.log_softmax(logits[:, :-1].float() / temperature, -1)  # (R, T-1, V)
    out = torch.zeros_like(rows.response_mask, dtype=torch.float32)  # (R, T)
    out[:, 1:] = logps.gather(-1, ids[:, 1:, None])[..., 0]
    return out * rows.response_mask


@torch.no_grad()
def tempered_token_logps(model: nn.Module, rows: Rows | PackedRows, temperature: float = 1.0,
                         chunk_size: int = DEFAULT_CHUNK) -> Tensor:
    """Per-token log softmax(logits / T) of the response tokens on an (R, T) grid, R = responses,
    0 elsewhere. T == 1 is training's own scorer (`softpo.logprobs`)."""
    packed = isinstance(rows, PackedRows)
    if temperature == 1.0:
        if packed:
            return score_tokens(model, rows, chunk_size)
        return token_logps(model, rows.input_ids, rows.attention_mask, rows.response_mask,
                           chunk_size)
    if not has_plain_head(model):
        if packed:
            raise UserError("the packed layout needs a plain linear output layer")
        return _full_logits_tempered(model, rows, temperature)
    if packed:
        states, shape = packed_states(model, rows), (rows.num_responses, rows.input_ids.shape[1])
    else:
        states = response_states(model, rows.input_ids, rows.attention_mask, rows.response_mask)
        shape = tuple(rows.input_ids.shape)
    head = hf_model(model).get_output_embeddings()
    return scatter_rows(_tempered_label_logps(states, head, temperature, chunk_size), states, shape)


def _batch_logps(model: nn.Module, examples: list[TokenizedExample], pad_id: int, layout: str,
                 temperature: float, chunk_size: int) -> list[Tensor]:
    """One forward for a group of prompts: each prompt's candidate log-probs, (n_b,) float64."""
    device = next(model.parameters()).device
    batch = collate(examples, pad_id).to(device)
    B, n = batch.response_valid.shape
    if layout == "packed":
        try:
            style = packable_style(model)
        except ValueError as e:
            raise UserError(f"layout 'packed': {e}") from None
        rows = pack(batch.input_ids, batch.response_mask, batch.response_valid, pad_id, style)
    else:
        rows = Rows(batch.input_ids, batch.attention_mask, batch.response_mask)
    logps = tempered_token_logps(model, rows, temperature, chunk_size).sum(-1)  # (B * n,)
    logps = logps.view(B, n).double().cpu()
    return [logps[b, :len(ex.response_ids)] for b, ex in enumerate(examples)]


def candidate_logps(model: nn.Module, tokenizer: Any, rows: Sequence[CandidateRow], *,
                    temperature: float = 1.0, layout: str = "padded", max_rows: int = 128,
                    stop_at_eos: bool = True, chunk_size: int = DEFAULT_CHUNK) -> list[Tensor]:
    """log p_i of every candidate of every row, (n_row,) float64 each (module docstring).

    `layout`: `padded` (a row per candidate) or `packed` (a row per prompt, its prompt computed
    once: `softpo.packing.pack` with the shared prompt); `max_rows` bounds the candidates of one
    forward (several prompts per forward); `stop_at_eos`: candidates end at their first EOS (what
    generate() returns) instead of running on to the end of the template's text."""
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout '{layout}' (known: {', '.join(LAYOUTS)})")
    if not temperature > 0 or not math.isfinite(temperature):
        raise UserError(f"temperature must be a positive number, got {temperature}")
    stops = eos_ids(model, tokenizer) if stop_at_eos else None
    examples = [tokenize_candidates(r, tokenizer, stops, context_length(model)) for r in rows]
    was_training = model.training
    model.eval()
    out: list[Tensor] = []
    try:
        for group in row_batches([len(r.candidates) for r in rows], max_rows):
            out += _batch_logps(model, [examples[i] for i in group], pad_token_id(tokenizer),
                                layout, temperature, chunk_size)
    finally:
        model.train(was_training)
    return out


# ---------------------------------------------------------------- metrics

def candidate_metrics(logps: Tensor, rewards: Sequence[float], alpha: float = 1.0,
                      threshold: float | None = None) -> dict[str, float]:
    """The module docstring's metrics from log p_i (n,) and rewards r_i (n,)."""
    logps = torch.as_tensor(logps, dtype=torch.float64)  # (n,)
    r = torch.as_tensor(list(rewards), dtype=torch.float64)  # (n,)
    tau = float(r.max()) if threshold is None else threshold
    good = r >= tau  # (n,) C
    k = int(good.sum())
    out = {"success": float(logps[good].exp().sum()), "outside": 1.0 - float(logps.exp().sum()),
           "reward": float((logps.exp() * r).sum()), "num_correct": float(k),
           "num_candidates": float(len(r))}
    if k:
        q_log = torch.log_softmax(logps[good], 0)  # (k,)
        q = q_log.exp()
        h = float(-(q * q_log).sum())
        out |= {"entropy": h / math.log(k) if k > 1 else 1.0, "kl_uniform": math.log(k) - h,
                "coverage": float((q >= 0.5 / k).double().mean()), "top_share": float(q.max())}
    m_log = torch.log_softmax(logps, 0)  # (n,) the model on the candidate set
    e_log = torch.log_softmax(r / alpha, 0)  # (n,) the expert
    out["kl_expert"] = float((m_log.exp() * (m_log - e_log)).sum())
    return out


def summarise(results: Sequence[PromptResult]) -> dict[str, float]:
    """The mean of every metric over the prompts that have it, and the number of prompts."""
    keys = dict.fromkeys(k for res in results for k in res.metrics)
    out = {"prompts": float(len(results))}
    for key in keys:
        values = [res.metrics[key] for res in results if key in res.metrics]
        out[key] = sum(values) / len(values)
    return out


def evaluate_candidates(model: nn.Module, tokenizer: Any, rows: Sequence[CandidateRow], *,
                        alpha: float = 1.0, threshold: float | None = None,
                        temperature: float = 1.0, layout: str = "padded", max_rows: int = 128,
                        stop_at_eos: bool = True) -> CandidateReport:
    """Every candidate's probability and the metrics per prompt and on average."""
    if not alpha > 0:
        raise UserError(f"alpha must be > 0, got {alpha}")
    all_logps = candidate_logps(model, tokenizer, rows, temperature=temperature, layout=layout,
                                max_rows=max_rows, stop_at_eos=stop_at_eos)
    results = []
    for row, logps in zip(rows, all_logps):
        scores = [CandidateScore(t, float(lp), math.exp(lp), float(r))
                  for t, lp, r in zip(row.candidates, logps.tolist(), row.rewards)]
        results.append(PromptResult(row.prompt, scores,
                                    candidate_metrics(logps, row.rewards, alpha, threshold)))
    return CandidateReport(results, summarise(results))


# ---------------------------------------------------------------- input rows

Scorer = Callable[[list, list[str]], list[float]]


def _list_field(ctx: _Ctx, record: dict, name: str) -> list:
    """A list-valued field; CSV cells hold it as JSON text."""
    value = record[name]
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except ValueError:
            ctx.fail("malformed_json", name, "is not a valid JSON list")
    if not isinstance(value, list):
        ctx.fail("wrong_type", name, f"must be a list, got {_type_name(value)}")
    return value


def _candidates(ctx: _Ctx, record: dict) -> list[str]:
    if "candidates" not in record:
        ctx.fail("missing_field", "candidates", "missing")
    cands = _list_field(ctx, record, "candidates")
    if not cands:
        ctx.fail("no_candidates", "candidates", "has no candidates")
    seen: dict[str, int] = {}
    for i, c in enumerate(cands):
        if not isinstance(c, str):
            ctx.fail("wrong_type", f"candidates[{i}]", f"must be a string, got {_type_name(c)}")
        if c in seen:
            ctx.fail("duplicate_candidates", f"candidates[{i}]",
                     f"{c!r} repeats candidates[{seen[c]}]")
        seen[c] = i
    return cands


def _rewards(ctx: _Ctx, record: dict, n: int) -> list[float]:
    rewards = _list_field(ctx, record, "rewards")
    if len(rewards) != n:
        ctx.fail("wrong_length", "rewards", f"has {len(rewards)} rewards for {n} candidates")
    for i, v in enumerate(rewards):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            ctx.fail("bad_reward", f"rewards[{i}]", f"must be a finite number, got {v!r}")
    return [float(v) for v in rewards]


def to_candidate_row(record: Any, source: str, row: int | None,
                     need_rewards: bool = True) -> CandidateRow:
    """Validate one record `{prompt, candidates, rewards}` (rewards optional when not
    `need_rewards`: they are then left empty for a scorer to fill)."""
    ctx = _Ctx(source, row)
    if isinstance(record, BadRowError):
        raise record
    if not isinstance(record, dict):
        ctx.fail("wrong_type", None, f"a row must be an object, got {_type_name(record)}")
    if "prompt" not in record:
        ctx.fail("missing_field", "prompt", "missing")
    prompt = _text(ctx, record["prompt"], "prompt")
    cands = _candidates(ctx, record)
    if "rewards" in record:
        rewards = _rewards(ctx, record, len(cands))
    elif need_rewards:
        ctx.fail("missing_field", "rewards", "missing (give rewards, or an expert to score the "
                 "candidates)")
    else:
        rewards = []
    return CandidateRow(prompt, cands, rewards, source, row or 0)


def score_rows(rows: list[CandidateRow], scorer: Scorer) -> list[CandidateRow]:
    """Rows without rewards get the scorer's rewards for their candidates (one scorer call)."""
    todo = [r for r in rows if not r.rewards]
    prompts = [r.prompt for r in todo for _ in r.candidates]
    scored = scorer(prompts, [c for r in todo for c in r.candidates]) if todo else []
    if len(scored) != len(prompts):
        raise UserError(f"the expert returned {len(scored)} rewards for {len(prompts)} candidates")
    rewards = iter(scored)
    return [r if r.rewards else CandidateRow(r.prompt, r.candidates,
                                             [float(next(rewards)) for _ in r.candidates],
                                             r.source, r.row) for r in rows]


def read_candidates(source: str, scorer: Scorer | None = None,
                    split: str = "train") -> list[CandidateRow]:
    """Validated rows of a candidates file (module docstring); rows without `rewards` are scored
    by `scorer` (without one they are an error)."""
    rows = []
    for part in open_source(source, split):
        for row, record in part.rows:
            rows.append(to_candidate_row(record, part.name, row, need_rewards=scorer is None))
    if not rows:
        raise UserError("no rows: the file is empty", source=source)
    return score_rows(rows, scorer) if scorer is not None else rows


def task_rows(split: str = "test", n: int = 64, seed: int = 0,
              families: tuple[str, ...] | None = None) -> list[CandidateRow]:
    """Rows from the `choices` task (softpo/tasks/choices.py): its prompts, every candidate,
    rewards by its expert reward."""
    from softpo.tasks import choices

    return [to_candidate_row(rec, f"choices:{split}", i)
            for i, rec in enumerate(choices.candidate_rows(split, n, seed, families), 1)]
