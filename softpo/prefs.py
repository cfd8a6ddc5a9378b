"""Preference data from an expert (`softpo build-prefs`): sample responses from a model, score them,
label them, write rows.

For each prompt, n responses are drawn by pure sampling (temperature 1, `softpo.sampling`), scored by
an expert (a `module:function` callable or a reward model, `softpo.tasks.experts`) and turned into
rows of one of softpo's formats:

* `pairs`      `{prompt, chosen, rejected, chosen_reward, rejected_reward}`
* `best_of_n`  `{prompt, responses, best, rewards}`
* `ranked`     `{prompt, responses, ranking, rewards}` (ranking: indices, best first)

Labels (`--pairing`) are either sampled from the expert's choice model or deterministic:

* `bt`: pairs get Bradley-Terry labels, P(a > b) = sigmoid((r_a - r_b) / T); best-of-n the Luce
  choice, P(best = i) = softmax(r / T)_i; ranked a Plackett-Luce ranking, drawn as the order of
  r_i / T + Gumbel noise (the Gumbel-max trick). T is `--bt-temperature`. Under these labels SPO's
  optimum is softmax(r / (T * alpha)) (DESIGN.md 1.2).
* `best-worst`: pairs are (a best, a worst) response; best-of-n the argmax; ranked the sort by
  reward. Ties are broken uniformly at random.

Responses with identical text are kept once (a row may not prefer a text to itself) and empty
responses are dropped. A prompt with fewer than two distinct responses gives no row and is counted.

Ties. By default a tie states no preference: pairs come from responses with different rewards only,
and a prompt whose responses all tie gives no row (counted). Then no pair ever compares two correct
answers, and nothing teaches the policy how to share its mass among equally good responses. With
`keep_ties` (`--keep-ties`) tied responses are compared as Bradley-Terry says equal rewards are,
P(a > b) = sigmoid(0) = 1/2, a fair coin:

* `bt` pairs are drawn among all pairs, tied ones included; a tied pair's label is the fair coin
  (the same sigmoid draw as every other pair).
* `best-worst` pairs: the (best, worst) pair as before (when the rewards differ) and, when at least
  two responses tie for the best reward, one more pair of two of them, chosen uniformly, its order a
  fair coin. So a prompt with several right answers also yields a right-versus-right pair; a prompt
  whose responses all tie yields that pair alone.
* best-of-n and ranked rows already put tied responses in uniformly random order (`bt`: the Luce /
  Plackett-Luce draw with equal weights; `best-worst`: random tie-breaks); with `keep_ties` a
  prompt whose responses all tie also gives a row (a uniformly random winner, a uniformly random
  order) instead of being skipped.

Without `keep_ties` the rows are exactly those of earlier versions. `BuildStats.tied` counts the
rows that hold a tie (a pair of equal rewards; a list with two equal rewards). The same arguments
give the same file: batch b of prompts is sampled
with seed `seed + first prompt index`, and each prompt's labels with a generator seeded by (seed,
prompt index). Prompts are encoded by the one prompt encoder training uses
(`softpo.collate.encode_prompt`, with the `DataConfig` given), so each response is trained after
exactly the tokens it was sampled after.
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from softpo.config import FORMATS, PAIRINGS, DataConfig
from softpo.errors import UserError
from softpo.sampling import sample_prompts


# ---------------------------------------------------------------- labelling (pure)

def bt_probability(r_a: float, r_b: float, temperature: float) -> float:
    """P(a preferred to b) = sigmoid((r_a - r_b) / T), computed without overflow."""
    z = (r_a - r_b) / temperature
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def _gumbel(rng: random.Random) -> float:
    return -math.log(-math.log(rng.random() or 1e-300))


def _argmax_ties_random(values: list[float], rng: random.Random) -> int:
    top = max(values)
    return rng.choice([i for i, v in enumerate(values) if v == top])


def label_pairs(rewards: list[float], pairing: str, temperature: float, rng: random.Random,
                pairs_per_prompt: int = 1, keep_ties: bool = False) -> list[tuple[int, int]]:
    """(winner, loser) index pairs among responses with different rewards (all pairs with
    `keep_ties`).

    best-worst: a best and a worst response; with `keep_ties` also two tied best responses in
    fair-coin order (module docstring). bt: `pairs_per_prompt` distinct unordered pairs drawn
    uniformly (0: all of them), each labelled by a Bradley-Terry coin flip (a fair coin for a tie)."""
    candidates = [(i, j) for i in range(len(rewards)) for j in range(i + 1, len(rewards))
                  if keep_ties or rewards[i] != rewards[j]]
    if not candidates:
        return []
    if pairing == "best-worst":
        return _best_worst_pairs(rewards, rng, keep_ties)
    if 0 < pairs_per_prompt < len(candidates):
        candidates = rng.sample(candidates, pairs_per_prompt)
    labelled = []
    for i, j in candidates:
        a_wins = rng.random() < bt_probability(rewards[i], rewards[j], temperature)
        labelled.append((i, j) if a_wins else (j, i))
    return labelled


def _best_worst_pairs(rewards: list[float], rng: random.Random,
                      keep_ties: bool) -> list[tuple[int, int]]:
    """(a best, a worst) when the rewards differ; with `keep_ties` and two or more responses tied
    for the best, also a uniformly chosen pair of them in fair-coin order."""
    pairs = []
    if len(set(rewards)) > 1:
        best = _argmax_ties_random(rewards, rng)
        worst = _argmax_ties_random([-r for r in rewards], rng)
        pairs.append((best, worst))
    top = [i for i, r in enumerate(rewards) if r == max(rewards)]
    if keep_ties and len(top) >= 2:
        i, j = rng.sample(top, 2)
        pairs.append((i, j) if rng.random() < 0.5 else (j, i))
    return pairs


def label_best(rewards: list[float], pairing: str, temperature: float, rng: random.Random) -> int:
    """The winner's index: argmax (best-worst) or a Luce draw from softmax(r / T) (bt)."""
    if pairing == "best-worst":
        return _argmax_ties_random(rewards, rng)
    return label_ranking(rewards, pairing, temperature, rng)[0]


def label_ranking(rewards: list[float], pairing: str, temperature: float,
                  rng: random.Random) -> list[int]:
    """Indices best first: sorted by reward (best-worst) or a Plackett-Luce draw (bt).

    Sorting r_i / T + g_i with g_i ~ Gumbel(0, 1) descending gives exactly the Plackett-Luce law
    P(tau) = prod_k exp(r_tau_k / T) / sum_{j >= k} exp(r_tau_j / T)."""
    if pairing == "best-worst":
        keys = [(r, rng.random()) for r in rewards]  # random tie-break
    else:
        keys = [(r / temperature + _gumbel(rng),) for r in rewards]
    return sorted(range(len(rewards)), key=lambda i: keys[i], reverse=True)


def make_rows(prompt: Any, texts: list[str], rewards: list[float], fmt: str, pairing: str,
              temperature: float, rng: random.Random, pairs_per_prompt: int = 1,
              keep_ties: bool = False) -> list[dict]:
    """Rows for one prompt from its distinct responses and their rewards ([] if all tie, unless
    `keep_ties`)."""
    if len(texts) < 2 or (len(set(rewards)) < 2 and not keep_ties):
        return []
    if fmt == "pairs":
        labelled = label_pairs(rewards, pairing, temperature, rng, pairs_per_prompt, keep_ties)
        return [{"prompt": prompt, "chosen": texts[w], "rejected": texts[l],
                 "chosen_reward": rewards[w], "rejected_reward": rewards[l]} for w, l in labelled]
    if fmt == "best_of_n":
        best = label_best(rewards, pairing, temperature, rng)
        return [{"prompt": prompt, "responses": texts, "best": best, "rewards": rewards}]
    ranking = label_ranking(rewards, pairing, temperature, rng)
    return [{"prompt": prompt, "responses": texts, "ranking": ranking, "rewards": rewards}]


# ---------------------------------------------------------------- sampling and scoring

@dataclass
class BuildStats:
    """What building the rows did: prompts, responses, duplicates, ties, rewards."""

    prompts: int = 0
    rows: int = 0
    responses: int = 0  # sampled
    distinct: int = 0  # distinct non-empty responses scored
    duplicates: int = 0
    empty: int = 0
    unfinished: int = 0  # cut at max_new_tokens before an end-of-sequence token
    skipped_ties: int = 0  # prompts whose distinct responses all have the same reward
    tied: int = 0  # rows holding a tie: a pair of equal rewards, a list with two equal rewards
    skipped_too_few: int = 0  # prompts with fewer than two distinct non-empty responses
    rewards: list[float] = field(default_factory=list)  # every sampled response, duplicates included

    def summary(self, success_threshold: float | None = None) -> dict:
        """The counts and reward statistics as a JSON-able dict (success rate with a threshold)."""
        out = {k: v for k, v in asdict(self).items() if k != "rewards"}
        r = self.rewards
        if r:
            out.update(reward_mean=statistics.fmean(r), reward_std=statistics.pstdev(r),
                       reward_min=min(r), reward_max=max(r),
                       reward_counts={f"{k:.4g}": v for k, v in sorted(Counter(r).items())})
            if success_threshold is not None:  # empty responses count as failures
                out["success_rate"] = sum(x >= success_threshold for x in r) / self.responses
        return out


def distinct_responses(texts: list[str]) -> tuple[list[str], list[int]]:
    """Non-empty texts kept once, in first-seen order, and for each input its kept index (-1 when
    empty)."""
    kept, index, where = [], {}, []
    for t in texts:
        if not t.strip():
            where.append(-1)
            continue
        if t not in index:
            index[t] = len(kept)
            kept.append(t)
        where.append(index[t])
    return kept, where


@dataclass(frozen=True)
class Labelling:
    """How a prompt's scored responses become rows: the format, the pairing, the Bradley-Terry
    temperature, the bt pairs per prompt and whether ties are compared (module docstring)."""

    fmt: str = "pairs"
    pairing: str = "bt"
    temperature: float = 1.0
    pairs_per_prompt: int = 1
    keep_ties: bool = False


def label_prompt(prompt: Any, kept: list[str], where: list[int], rewards: list[float],
                 labelling: Labelling, rng: random.Random, stats: BuildStats) -> list[dict]:
    """Rows for one prompt from its distinct responses `kept` (`distinct_responses`) and their
    rewards, labelled with `rng`; the prompt's samples, rows, ties and skips counted in `stats`.
    build-prefs and online SPO (`softpo.online`) label through this one function."""
    _count(stats, kept, where, rewards)
    rows = make_rows(prompt, kept, rewards, labelling.fmt, labelling.pairing,
                     labelling.temperature, rng, labelling.pairs_per_prompt, labelling.keep_ties)
    stats.tied += sum(map(has_tie, rows))
    if not rows:
        stats.skipped_too_few += len(kept) < 2
        stats.skipped_ties += len(kept) >= 2
    stats.rows += len(rows)
    return rows


def chat_prompts(prompts: list, chat: bool) -> list:
    """With `chat`, string prompts become one user message; conversations stay as they are."""
    return [[{"role": "user", "content": p}] if chat and isinstance(p, str) else p
            for p in prompts]


def prompt_key(prompt: Any) -> str:
    """A prompt (a string or a conversation) as one hashable, JSON-able string."""
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def build_preferences(model, tokenizer, prompts: list, scorer, *, n: int, max_new_tokens: int,
                      seed: int, fmt: str = "pairs", pairing: str = "bt", temperature: float = 1.0,
                      pairs_per_prompt: int = 1, batch_size: int = 8, chat: bool = False,
                      progress: bool = True, data_cfg: DataConfig | None = None,
                      keep_ties: bool = False) -> tuple[list[dict], BuildStats]:
    """Sample n responses per prompt, score the distinct ones, label them; rows and stats.
    With `chat`, string prompts become one user message (in the rows too: they were sampled so).
    Prompts are encoded as a run with `data_cfg` (default: `DataConfig()`) will encode them.
    `keep_ties`: tied responses are compared too, by a fair coin (module docstring)."""
    from tqdm.auto import tqdm

    if fmt not in FORMATS or pairing not in PAIRINGS or n < 2 or not temperature > 0:
        raise UserError(f"build_preferences: need fmt in {FORMATS}, pairing in {PAIRINGS}, n >= 2 "
                        f"and temperature > 0 (got {fmt!r}, {pairing!r}, {n}, {temperature})")
    prompts = chat_prompts(prompts, chat)
    labelling = Labelling(fmt, pairing, temperature, pairs_per_prompt, keep_ties)
    rows, stats, data_cfg = [], BuildStats(), data_cfg or DataConfig()
    bar = tqdm(total=len(prompts), unit="prompt", desc="build-prefs", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        batch = sample_prompts(model, tokenizer, chunk, data_cfg, n, max_new_tokens, seed + start)
        texts = batch.texts(tokenizer)  # (P*n,) grouped by prompt
        stats.unfinished += int((~batch.finished).sum())
        distinct = [distinct_responses(texts[p * n:(p + 1) * n]) for p in range(len(chunk))]
        flat = [(prompt, t) for prompt, (kept, _) in zip(chunk, distinct) for t in kept]
        scores = iter(scorer([f[0] for f in flat], [f[1] for f in flat]) if flat else [])
        for p, (prompt, (kept, where)) in enumerate(zip(chunk, distinct)):
            rewards = [next(scores) for _ in kept]
            rng = random.Random(f"build-prefs:{seed}:{start + p}")
            rows += label_prompt(prompt, kept, where, rewards, labelling, rng, stats)
        stats.prompts += len(chunk)
        bar.update(len(chunk))
        bar.set_postfix(reward=f"{statistics.fmean(stats.rewards):.3f}" if stats.rewards else "-",
                        rows=len(rows))
    bar.close()
    return rows, stats


def has_tie(row: dict) -> bool:
    """Whether a row compares equal rewards: a pair of equal rewards, or a list with two equal."""
    if "chosen_reward" in row:
        return row["chosen_reward"] == row["rejected_reward"]
    return len(set(row["rewards"])) < len(row["rewards"])


def _count(stats: BuildStats, kept: list[str], where: list[int], rewards: list[float]) -> None:
    stats.responses += len(where)
    stats.empty += where.count(-1)
    stats.distinct += len(kept)
    stats.duplicates += len(where) - where.count(-1) - len(kept)
    stats.rewards += [rewards[i] for i in where if i >= 0]


# ---------------------------------------------------------------- writing

def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary sibling, then rename over `path`: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write rows as JSON Lines, atomically."""
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def summary_path(out: Path) -> Path:
    """`prefs.jsonl` -> `prefs.summary.json`."""
    return out.with_name(out.name.removesuffix(".jsonl") + ".summary.json")
