"""Generative evaluation with an expert (`softpo eval MODEL... --prompts FILE --expert ...`).

Each model draws k responses to every held-out prompt (the sampler training uses: pure sampling,
or softmax(logits / temperature) with another temperature; the same seeds for every model), an
expert scores them (once per distinct (prompt, response), shared by all models of a call), and the
samples are summarised. With P prompts, k samples each, rewards r_i and successes s_i = [r_i >= t]
(t the success threshold):

    reward           mean of r over the P*k samples; reward_sd their standard deviation (n - 1)
    reward_se        standard error of the mean reward with the prompts as independent units:
                     sd of the P per-prompt means / sqrt(P) (a prompt's samples are correlated);
                     with one prompt, reward_sd / sqrt(k)
    success          mean of s
    pass@j           for j = 1..k, the unbiased estimate 1 - C(k - c, j) / C(k, j) (c: the prompt's
                     successes; `softpo.evaluation.pass_at_k`), averaged over the prompts
    distinct_correct the number of different answers among a prompt's successful samples (case,
                     surrounding whitespace and a trailing period ignored:
                     `softpo.evaluation.distinct_successes`), 0..k, averaged over the prompts
    distinct_1, _2   distinct word n-grams over all n-grams of a prompt's k samples, averaged over
                     the prompts that have any
    self_similarity  mean pairwise Jaccard similarity of the word sets of a prompt's k samples,
                     averaged over the prompts (1: the same words every time; needs k >= 2)
    length           mean response tokens (the end-of-turn token counted when reached)
    truncated        share of samples cut at max_new_tokens (no end-of-turn token)
    kl               with a reference: mean over samples y ~ pi of log pi(y|x) - log pi_ref(y|x),
                     an unbiased Monte Carlo estimate of the sequence KL(pi || pi_ref), nats
    entropy          -mean log pi(y|x), an unbiased estimate of the sequence entropy, nats
    ref_nll          with a reference: -sum log pi_ref(y|x) / sum of the samples' tokens, how
                     unlikely the reference finds the answers, nats per token (its own answers
                     score their entropy per token; answers that left its language score higher)

kl and entropy are expectations under the model's own distribution, so they are reported only at
temperature 1 (samples at another temperature come from another distribution). Words are
whitespace-separated, so the diversity numbers compare models with different tokenizers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from softpo.config import DataConfig
from softpo.errors import UserError
from softpo.evaluation import (DrawnSamples, distinct_n, distinct_successes, draw_samples,
                               pass_at_k, self_similarity)
from softpo.report import markdown_table

SAMPLES, SUMMARY_JSON, SUMMARY_MD = "samples.jsonl", "summary.json", "summary.md"


@dataclass
class EvalSettings:
    """How every model of one evaluation is sampled and judged."""

    k: int = 4  # samples per prompt
    max_new_tokens: int = 64
    seed: int = 0  # sampling seed, the same for every model
    temperature: float = 1.0  # 1: pure sampling, as in training
    success_threshold: float = 1.0  # a sample with reward >= this is a success
    batch_size: int = 8  # prompts sampled together
    data_cfg: DataConfig = field(default_factory=DataConfig)  # prompt encoding (max_prompt_length)


@dataclass
class ModelEval:
    """The summary of one model's samples (module docstring)."""

    model: str
    prompts: int
    samples: int
    reward: float
    reward_sd: float
    reward_se: float
    success: float
    pass_at: dict[int, float]
    distinct_1: float
    distinct_2: float
    self_similarity: float
    length: float
    truncated: float
    distinct_correct: float = 0.0
    kl: float | None = None
    entropy: float | None = None
    ref_nll: float | None = None

    def as_dict(self) -> dict:
        """Flat numbers: `pass@j` keys for every j, None for what was not measured."""
        out = {k: v for k, v in asdict(self).items() if k != "pass_at"}
        out.update({f"pass@{j}": v for j, v in self.pass_at.items()})
        return {k: _finite_or_none(v) for k, v in out.items()}


class ExpertCache:
    """A scorer `scorer(prompts, responses) -> rewards` (`softpo.tasks.experts.load_scorer`: finite
    floats, or a one-line UserError) called once per distinct (prompt, response): repeated pairs,
    within a model's samples or across models, reuse the reward."""

    def __init__(self, scorer: Callable[[list, list[str]], list[float]]):
        self.scorer = scorer
        self.rewards: dict[tuple[str, str], float] = {}

    def __call__(self, prompts: list, responses: list[str]) -> list[float]:
        """One reward per pair, in order."""
        keys = [(json.dumps(p, sort_keys=True), r) for p, r in zip(prompts, responses)]
        todo = {}
        for key, prompt, response in zip(keys, prompts, responses):
            if key not in self.rewards and key not in todo:
                todo[key] = (prompt, response)
        if todo:
            pairs = list(todo.values())
            scores = self.scorer([p for p, _ in pairs], [r for _, r in pairs])
            if len(scores) != len(pairs):
                raise UserError(f"the expert returned {len(scores)} rewards for {len(pairs)} "
                                "responses")
            for key, score in zip(todo, scores):
                self.rewards[key] = float(score)
        return [self.rewards[key] for key in keys]


def _finite_or_none(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


# ---------------------------------------------------------------- the numbers

def summarize(name: str, drawn: DrawnSamples, rewards: list[float], num_prompts: int,
              s: EvalSettings) -> ModelEval:
    """The numbers of the module docstring from one model's samples and their rewards."""
    k = s.k
    by_prompt = [list(range(i * k, (i + 1) * k)) for i in range(num_prompts)]  # prompt-major
    means = [statistics.fmean(rewards[j] for j in idx) for idx in by_prompt]
    sd = statistics.stdev(rewards) if len(rewards) > 1 else float("nan")
    se = statistics.stdev(means) / math.sqrt(num_prompts) if num_prompts > 1 else \
        sd / math.sqrt(k)
    hits = [sum(rewards[j] >= s.success_threshold for j in idx) for idx in by_prompt]
    texts = [[drawn.texts[j] for j in idx] for idx in by_prompt]
    right = [[rewards[j] >= s.success_threshold for j in idx] for idx in by_prompt]
    pure = s.temperature == 1.0
    logps = drawn.policy_logps.double()  # (S,)
    kl = float((logps - drawn.ref_logps.double()).mean()) \
        if pure and drawn.ref_logps is not None else None
    return ModelEval(
        model=name, prompts=num_prompts, samples=len(rewards), reward=statistics.fmean(rewards),
        reward_sd=sd, reward_se=se, success=sum(hits) / len(rewards),
        pass_at={j: statistics.fmean(pass_at_k(k, c, j) for c in hits) for j in range(1, k + 1)},
        distinct_1=_per_prompt_distinct(texts, 1), distinct_2=_per_prompt_distinct(texts, 2),
        self_similarity=statistics.fmean(self_similarity(t) for t in texts) if k > 1
        else float("nan"),
        length=float(drawn.lengths.double().mean()),
        truncated=float((~drawn.finished).double().mean()),
        distinct_correct=statistics.fmean(map(distinct_successes, texts, right)),
        kl=kl, entropy=float(-logps.mean()) if pure else None,
        ref_nll=None if drawn.ref_logps is None else
        float(-drawn.ref_logps.double().sum() / drawn.lengths.double().sum()))


def _per_prompt_distinct(texts: list[list[str]], n: int) -> float:
    """distinct-n of each prompt's samples, averaged over the prompts that have any n-gram."""
    values = [distinct_n(t, n) for t in texts if any(len(x.split()) >= n for x in t)]
    return statistics.fmean(values) if values else 0.0


def evaluate_model(name: str, model, tokenizer, prompts: list, expert: ExpertCache,
                   s: EvalSettings, reference=None, progress=None) -> tuple[ModelEval, list[dict]]:
    """Sample, score and summarise one model; returns the summary and one record per sample."""
    drawn = draw_samples(model, tokenizer, prompts, s.data_cfg, reference, s.k, s.max_new_tokens,
                         s.seed, s.batch_size, s.temperature, progress)
    owners = drawn.owners
    rewards = expert([prompts[o] for o in owners], drawn.texts)
    summary = summarize(name, drawn, rewards, len(prompts), s)
    ref = drawn.ref_logps.tolist() if drawn.ref_logps is not None else [None] * len(owners)
    records = [{"model": name, "prompt_index": o, "sample": i % s.k, "prompt": prompts[o],
                "response": text, "reward": r, "success": r >= s.success_threshold,
                "tokens": int(n), "truncated": not bool(f), "logp": float(lp), "ref_logp": rl}
               for i, (o, text, r, n, f, lp, rl) in enumerate(zip(
                   owners, drawn.texts, rewards, drawn.lengths.tolist(), drawn.finished.tolist(),
                   drawn.policy_logps.tolist(), ref))]
    return summary, records


def evaluate_models(names: list[str], prompts: list, scorer, s: EvalSettings,
                    ref: str | None = None, device=None,
                    progress: bool = False) -> tuple[list[ModelEval], list[dict]]:
    """Load each model by name (a folder, a LoRA run's `final/`, `default`, `tiny` or a hub name)
    in turn and evaluate it on the same prompts with the same seeds; `ref` names the reference
    for the KL. Returns one summary per model and every sample's record."""
    import gc

    from tqdm.auto import tqdm

    from softpo.config import ModelConfig
    from softpo.logprobs import Reference
    from softpo.models import load_model, load_tokenizer, model_folder_kind

    for name in [*names, *([ref] if ref else [])]:  # a bad folder fails before any sampling
        model_folder_kind(name)
    expert = scorer if isinstance(scorer, ExpertCache) else ExpertCache(scorer)
    reference = ref_vocab = None
    if ref is not None:
        ref_cfg = ModelConfig(name_or_path=ref)
        ref_tokenizer = load_tokenizer(ref_cfg)
        ref_model = load_model(ref_cfg, ref_tokenizer, seed=0).to(device or "cpu").eval()
        reference, ref_vocab = Reference(ref_model, adapter_toggle=False), ref_tokenizer.get_vocab()
    summaries, records = [], []
    for name in names:
        cfg = ModelConfig(name_or_path=name)
        tokenizer = load_tokenizer(cfg)
        if ref_vocab is not None and tokenizer.get_vocab() != ref_vocab:
            raise UserError(f"model '{name}' and the reference '{ref}' have different "
                            "tokenizers; the KL needs the same tokens")
        model = load_model(cfg, tokenizer, seed=0).to(device or "cpu").eval()
        bar = tqdm(total=len(prompts), desc=f"eval {name}", unit="prompt", disable=not progress)
        summary, rows = evaluate_model(name, model, tokenizer, prompts, expert, s, reference, bar)
        bar.close()
        summaries.append(summary)
        records += rows
        del model
        gc.collect()
    return summaries, records


# ---------------------------------------------------------------- tables and files

def shown_ks(k: int) -> list[int]:
    """The pass@j columns of the printed table: 1, the powers of two below k, and k."""
    return sorted({1, k} | {2 ** i for i in range(1, k.bit_length()) if 2 ** i < k})


def results_table(summaries: list[ModelEval], k: int, all_ks: bool = False) -> str:
    """One Markdown row per model (pass@j for `shown_ks(k)`, or every j with `all_ks`)."""
    ks = list(range(1, k + 1)) if all_ks else shown_ks(k)
    header = ["model", "reward", "se", "sd", "success", *[f"pass@{j}" for j in ks],
              "distinct-1", "distinct-2", "self-sim", "tokens", "cut", "KL to ref", "entropy",
              "ref NLL/tok"]
    rows = []
    for m in summaries:
        values = [m.reward, m.reward_se, m.reward_sd, m.success, *[m.pass_at[j] for j in ks],
                  m.distinct_1, m.distinct_2, m.self_similarity, m.length, m.truncated, m.kl,
                  m.entropy, m.ref_nll]
        rows.append([m.model, *("-" if v is None or not math.isfinite(v) else float(v)
                                for v in values)])
    return markdown_table(header, rows)


def settings_line(num_prompts: int, s: EvalSettings, expert: str, ref: str | None) -> str:
    """What was measured, in one line (printed above the table)."""
    how = "pure sampling" if s.temperature == 1.0 else \
        f"temperature {s.temperature:g} (no KL or entropy)"
    return (f"{num_prompts} prompts x {s.k} samples per model, {how}, seed {s.seed}, at most "
            f"{s.max_new_tokens} new tokens; expert {expert}; success: reward >= "
            f"{s.success_threshold:g}" + (f"; KL to {ref}" if ref else ""))


def summary_document(summaries: list[ModelEval], num_prompts: int, s: EvalSettings, expert: str,
                     ref: str | None, prompts_source: str) -> tuple[dict, str]:
    """The summary as JSON-ready data and as Markdown."""
    settings = {"prompts": prompts_source, "num_prompts": num_prompts, "k": s.k,
                "max_new_tokens": s.max_new_tokens, "seed": s.seed, "temperature": s.temperature,
                "success_threshold": s.success_threshold,
                "max_prompt_length": s.data_cfg.max_prompt_length, "expert": expert, "ref": ref}
    data = {"settings": settings, "models": [m.as_dict() for m in summaries]}
    text = "\n".join([
        "# softpo eval", "", settings_line(num_prompts, s, expert, ref) + f" (prompts: "
        f"`{prompts_source}`).", "", results_table(summaries, s.k, all_ks=True), "",
        "reward: mean expert reward (se: standard error over prompts, sd: over samples); "
        "success: share of samples with reward >= the threshold; pass@j: unbiased estimate "
        "1 - C(k-c, j)/C(k, j) averaged over prompts; distinct-n and self-sim (mean pairwise "
        "Jaccard of word sets) within a prompt's samples; tokens: mean response length; cut: "
        "share cut at the token limit; KL to ref and entropy: Monte Carlo, nats per response; "
        "ref NLL/tok: the reference's negative log-likelihood of the samples, nats per token.",
        ""])
    return data, text


def write_outputs(out_dir: str | Path, records: list[dict], summary: dict, markdown: str) -> Path:
    """`samples.jsonl`, `summary.json` and `summary.md` in `out_dir`. All three are written to
    temporary files first and renamed into place only when all are written, so a failure leaves no
    half-written file (and no folder, when this call created it)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError("--out must be a folder, got a file", source=str(out_dir))
    created = not out_dir.exists()
    texts = {SAMPLES: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
             SUMMARY_JSON: json.dumps(summary, indent=2) + "\n", SUMMARY_MD: markdown}
    temps: dict[str, Path] = {}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        for name, text in texts.items():
            temps[name] = out_dir / f".{name}.tmp-{tag}"
            temps[name].write_text(text, encoding="utf-8")
        for name, tmp in temps.items():
            os.replace(tmp, out_dir / name)
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return out_dir
