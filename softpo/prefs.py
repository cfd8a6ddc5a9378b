"""`softpo build-prefs`: sample responses from a model, score them with an expert, write preferences.

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
responses are dropped. A prompt whose responses all tie (or that has fewer than two distinct
responses) gives no row and is counted. Pairs come from responses with different rewards only: a
tie states no preference. The same arguments give the same file: batch b of prompts is sampled
with seed `seed + first prompt index`, and each prompt's labels with a generator seeded by (seed,
prompt index).
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from softpo.errors import UserError
from softpo.sampling import encode_prompts, sample

FORMATS = ("pairs", "best_of_n", "ranked")
PAIRINGS = ("bt", "best-worst")


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
                pairs_per_prompt: int = 1) -> list[tuple[int, int]]:
    """(winner, loser) index pairs among responses with different rewards.

    best-worst: one pair, a best and a worst response. bt: `pairs_per_prompt` distinct unordered
    pairs drawn uniformly (0: all of them), each labelled by a Bradley-Terry coin flip."""
    candidates = [(i, j) for i in range(len(rewards)) for j in range(i + 1, len(rewards))
                  if rewards[i] != rewards[j]]
    if not candidates:
        return []
    if pairing == "best-worst":
        best = _argmax_ties_random(rewards, rng)
        worst = _argmax_ties_random([-r for r in rewards], rng)
        return [(best, worst)]
    if 0 < pairs_per_prompt < len(candidates):
        candidates = rng.sample(candidates, pairs_per_prompt)
    labelled = []
    for i, j in candidates:
        a_wins = rng.random() < bt_probability(rewards[i], rewards[j], temperature)
        labelled.append((i, j) if a_wins else (j, i))
    return labelled


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
              temperature: float, rng: random.Random, pairs_per_prompt: int = 1) -> list[dict]:
    """Rows for one prompt from its distinct responses and their rewards ([] if all tie)."""
    if len(texts) < 2 or len(set(rewards)) < 2:
        return []
    if fmt == "pairs":
        return [{"prompt": prompt, "chosen": texts[w], "rejected": texts[l],
                 "chosen_reward": rewards[w], "rejected_reward": rewards[l]}
                for w, l in label_pairs(rewards, pairing, temperature, rng, pairs_per_prompt)]
    if fmt == "best_of_n":
        best = label_best(rewards, pairing, temperature, rng)
        return [{"prompt": prompt, "responses": texts, "best": best, "rewards": rewards}]
    ranking = label_ranking(rewards, pairing, temperature, rng)
    return [{"prompt": prompt, "responses": texts, "ranking": ranking, "rewards": rewards}]


# ---------------------------------------------------------------- sampling and scoring

@dataclass
class BuildStats:
    prompts: int = 0
    rows: int = 0
    responses: int = 0  # sampled
    distinct: int = 0  # distinct non-empty responses scored
    duplicates: int = 0
    empty: int = 0
    unfinished: int = 0  # cut at max_new_tokens before an end-of-sequence token
    skipped_ties: int = 0  # prompts whose distinct responses all have the same reward
    skipped_too_few: int = 0  # prompts with fewer than two distinct non-empty responses
    rewards: list[float] = field(default_factory=list)  # every sampled response, duplicates included

    def summary(self, success_threshold: float | None = None) -> dict:
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


def build_preferences(model, tokenizer, prompts: list, scorer, *, n: int, max_new_tokens: int,
                      seed: int, fmt: str = "pairs", pairing: str = "bt", temperature: float = 1.0,
                      pairs_per_prompt: int = 1, batch_size: int = 8, chat: bool = False,
                      progress: bool = True) -> tuple[list[dict], BuildStats]:
    """Sample n responses per prompt, score the distinct ones, label them; rows and stats.
    With `chat`, string prompts become one user message (in the rows too: they were sampled so)."""
    from tqdm.auto import tqdm

    if fmt not in FORMATS or pairing not in PAIRINGS or n < 2 or not temperature > 0:
        raise UserError(f"build_preferences: need fmt in {FORMATS}, pairing in {PAIRINGS}, n >= 2 "
                        f"and temperature > 0 (got {fmt!r}, {pairing!r}, {n}, {temperature})")
    prompts = [[{"role": "user", "content": p}] if chat and isinstance(p, str) else p
               for p in prompts]
    rows, stats = [], BuildStats()
    device = next(model.parameters()).device
    bar = tqdm(total=len(prompts), unit="prompt", desc="build-prefs", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids, mask = encode_prompts(tokenizer, chunk)  # (P, Lp)
        batch = sample(model, tokenizer, ids.to(device), mask.to(device), n, max_new_tokens,
                       seed + start)
        texts = batch.texts(tokenizer)  # (P*n,) grouped by prompt
        stats.unfinished += int((~batch.finished).sum())
        distinct = [distinct_responses(texts[p * n:(p + 1) * n]) for p in range(len(chunk))]
        flat = [(prompt, t) for prompt, (kept, _) in zip(chunk, distinct) for t in kept]
        scores = iter(scorer([f[0] for f in flat], [f[1] for f in flat]) if flat else [])
        for p, (prompt, (kept, where)) in enumerate(zip(chunk, distinct)):
            rewards = [next(scores) for _ in kept]
            _count(stats, kept, where, rewards)
            rng = random.Random(f"build-prefs:{seed}:{start + p}")
            new = make_rows(prompt, kept, rewards, fmt, pairing, temperature, rng, pairs_per_prompt)
            if not new:
                stats.skipped_too_few += len(kept) < 2
                stats.skipped_ties += len(kept) >= 2
            rows += new
        stats.prompts += len(chunk)
        stats.rows = len(rows)
        bar.update(len(chunk))
        bar.set_postfix(reward=f"{statistics.fmean(stats.rewards):.3f}" if stats.rewards else "-",
                        rows=len(rows))
    bar.close()
    return rows, stats


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
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def summary_path(out: Path) -> Path:
    """`prefs.jsonl` -> `prefs.summary.json`."""
    return out.with_name(out.name.removesuffix(".jsonl") + ".summary.json")


# ---------------------------------------------------------------- `softpo build-prefs`

def build_prefs_arguments(p) -> None:
    p.add_argument("--model", default="default",
                   help="model that samples: folder, hub name, `tiny` or `default` (SmolLM2)")
    src = p.add_argument_group("prompts (one source)")
    src.add_argument("--prompts", help="prompt file: JSONL/JSON/CSV/Parquet with `prompt` (a "
                     "string or messages), or .txt one per line")
    src.add_argument("--task", help="a shipped task family (arithmetic, arithmetic-compare, "
                     "arithmetic-sums): its prompts, and its reward when no expert is given")
    src.add_argument("--split", default="train", help="task split: train or test")
    src.add_argument("--num-prompts", type=int, default=64, help="prompts drawn from the task")
    src.add_argument("--chat", action="store_true", help="wrap string prompts as a user turn")
    ex = p.add_argument_group("expert (one of)")
    ex.add_argument("--expert", help="Python callable `module:function` (prompt, response) -> "
                    "float, e.g. softpo.tasks.arithmetic:reward")
    ex.add_argument("--reward-model", help="sequence-classification reward model (folder or hub "
                    "name, safetensors)")
    p.add_argument("-n", "--num-responses", type=int, default=4, help="responses per prompt (>= 2)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=FORMATS, default="pairs")
    p.add_argument("--pairing", choices=PAIRINGS, default="bt",
                   help="bt: labels sampled from Bradley-Terry / Luce / Plackett-Luce; "
                   "best-worst: deterministic (best vs worst, argmax, sorted)")
    p.add_argument("--bt-temperature", type=float, default=1.0,
                   help="T in P(a > b) = sigmoid((r_a - r_b) / T)")
    p.add_argument("--pairs-per-prompt", type=int, default=1,
                   help="bt pairs per prompt among responses with different rewards (0: all)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts sampled together")
    p.add_argument("--out", required=True, help="output JSONL (a .summary.json is written beside)")
    p.add_argument("--no-progress", action="store_true")


def _check_args(args) -> None:
    if (args.prompts is None) == (args.task is None):
        raise UserError("give exactly one prompt source: --prompts FILE or --task NAME")
    checks = [(args.num_responses >= 2, f"-n/--num-responses must be >= 2, got {args.num_responses}"),
              (args.max_new_tokens >= 1, "--max-new-tokens must be >= 1"),
              (args.batch_size >= 1, "--batch-size must be >= 1"),
              (args.num_prompts >= 1, "--num-prompts must be >= 1"),
              (args.pairs_per_prompt >= 0, "--pairs-per-prompt must be >= 0"),
              (math.isfinite(args.bt_temperature) and args.bt_temperature > 0,
               f"--bt-temperature must be > 0, got {args.bt_temperature}"),
              (args.out.endswith(".jsonl"), f"--out must end in .jsonl, got '{args.out}'")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def _prompts_and_expert(args) -> tuple[list, str | None, float | None]:
    """The prompts, the expert spec to use (the task's reward when none is given) and, when that
    is the task's reward, the task's success threshold."""
    if args.prompts:
        from softpo.data import read_prompts

        return read_prompts(args.prompts), args.expert, None
    from softpo.tasks import get_task

    task = get_task(args.task)
    expert = args.expert if args.expert or args.reward_model else task.reward_spec
    threshold = task.success_threshold if expert == task.reward_spec else None
    return task.make_prompts(args.split, args.num_prompts, args.seed), expert, threshold


def build_prefs_command(args) -> int:
    from softpo.config import ModelConfig
    from softpo.hardware import default_device
    from softpo.models import load_model, load_tokenizer
    from softpo.tasks.experts import load_scorer

    _check_args(args)
    prompts, expert, threshold = _prompts_and_expert(args)
    device = default_device()
    scorer, described = load_scorer(expert, args.reward_model, device=device)
    cfg = ModelConfig(name_or_path=args.model)
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, tokenizer, seed=args.seed).to(device).eval()
    began = time.perf_counter()
    rows, stats = build_preferences(
        model, tokenizer, prompts, scorer, n=args.num_responses, max_new_tokens=args.max_new_tokens,
        seed=args.seed, fmt=args.format, pairing=args.pairing, temperature=args.bt_temperature,
        pairs_per_prompt=args.pairs_per_prompt, batch_size=args.batch_size, chat=args.chat,
        progress=not args.no_progress)
    elapsed = time.perf_counter() - began
    if not rows:
        raise UserError(f"no rows: the responses to all {stats.prompts} prompts tied or were too "
                        "few (try more -n or a longer --max-new-tokens)")
    out = Path(args.out)
    write_jsonl(out, rows)
    summary = {"out": str(out), "model": args.model, "expert": described, "format": args.format,
               "pairing": args.pairing, "bt_temperature": args.bt_temperature,
               "num_responses": args.num_responses, "max_new_tokens": args.max_new_tokens,
               "seed": args.seed, "prompt_source": args.prompts or f"task {args.task}:{args.split}",
               **stats.summary(threshold), "seconds": round(elapsed, 2)}
    write_atomic(summary_path(out), json.dumps(summary, indent=2) + "\n")
    print(f"softpo: wrote {stats.rows} {args.format} rows from {stats.prompts} prompts to {out} "
          f"(reward mean {summary['reward_mean']:.3f}; skipped {stats.skipped_ties} all-tie and "
          f"{stats.skipped_too_few} too-few prompts; {elapsed:.1f}s)", file=sys.stderr)
    return 0
