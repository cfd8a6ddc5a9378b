"""SPO learning what a user's expert wants, on real-length answers (docs/experts.md).

    python scripts/expert_study.py --expert concise --seeds 0 1 2 --out runs/expert_study
    python scripts/expert_study.py --expert concise --points spo-a1,spo-a0.03,dpo --seeds 0

For each expert and seed: the embedded SmolLM2-135M-Instruct samples `n` answers to each of the
128 training questions (examples/data/questions_train.jsonl, as a user turn, 32 new tokens), the
expert labels them (`softpo build-prefs` with the point's pairing and format), LoRA adapters are
trained for `steps` steps at learning rate `lr` (configs/smollm2_lora.yaml; bf16 autocast where the hardware has fast
bf16, as `softpo demo`), and every model answers the 55 held-out
questions 4 times (pure sampling, 32 new tokens): mean expert reward, the share of answers cut at
the token limit, the sequence KL to the reference and the entropy (both from the samples'
log-probs), and the share of training pairs whose preference term is saturated at the start.

Every point is one line of `<out>/points.jsonl` (appended as it finishes, so a run can be stopped
and continued: finished points are skipped).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EXPERTS = {"concise": "examples.experts.concise:reward", "plain": "examples.experts.plain:reward"}
TRAIN = ROOT / "examples" / "data" / "questions_train.jsonl"
HELDOUT = ROOT / "examples" / "data" / "questions_heldout.jsonl"


@dataclass(frozen=True)
class Point:
    """One trained model: the loss and its knobs, and how its data were labelled."""

    name: str
    loss: str = "spo"
    alpha: float = 1.0
    beta: float = 0.05
    gamma: float = 0.0
    n: int = 4  # answers per training question
    pairing: str = "best-worst"
    fmt: str = "pairs"
    bt_temperature: float = 1.0
    pairs_per_prompt: int = 1
    keep_ties: bool = False
    online_every: int = 0  # > 0: no offline data; the policy answers 40 new questions this often
    steps: int = 30
    lr: float = 1e-3
    overrides: tuple[str, ...] = field(default_factory=tuple)

    @property
    def data_key(self) -> tuple:
        return (self.n, self.pairing, self.fmt, self.bt_temperature, self.pairs_per_prompt,
                self.keep_ties)


def points() -> dict[str, Point]:
    out = [Point("reference", loss="none")]
    for a in (1.0, 0.3, 0.1, 0.03, 0.01):
        out.append(Point(f"spo-a{a:g}", alpha=a))
    out += [Point("dpo", loss="dpo", beta=0.1),
            Point("spo-a0.03-bt", alpha=0.03, pairing="bt", bt_temperature=0.1, pairs_per_prompt=0),
            Point("spo-a0.03-n8", alpha=0.03, n=8),
            Point("spo-a0.03-ranked", loss="spo_ranked", alpha=0.03, fmt="ranked"),
            Point("spo-a0.03-mu", alpha=0.03, gamma=1.0),
            Point("spo-a0.03-beta0", alpha=0.03, beta=0.0)]
    for tag in ("3e-4", "1e-4"):  # the same points at smaller learning rates (3e-4: the config's)
        lr = float(tag)
        out += [Point(f"spo-a{a:g}-lr{tag}", alpha=a, lr=lr) for a in (1.0, 0.3, 0.1)]
        out += [Point(f"spo-a1-beta{b:g}-lr{tag}", beta=b, lr=lr) for b in (0.2, 0.5, 2.0)]
        out.append(Point(f"dpo-lr{tag}", loss="dpo", beta=0.1, lr=lr))
        out += [Point(f"spo-a1-bt0.1-lr{tag}", pairing="bt", bt_temperature=0.1,
                      pairs_per_prompt=0, lr=lr),
                Point(f"spo-a1-n8-lr{tag}", n=8, lr=lr),
                Point(f"spo-a1-ranked-lr{tag}", loss="spo_ranked", fmt="ranked", lr=lr)]
    out += [Point("spo-a1-mu-lr3e-4", gamma=1.0, lr=3e-4),
            Point("spo-a1-ties-lr3e-4", keep_ties=True, lr=3e-4),  # best-worst, ties kept
            # Bradley-Terry labels with one pair per question: bt0.1 less its extra pairs
            Point("spo-a1-bt0.1-1pair-lr3e-4", pairing="bt", bt_temperature=0.1, lr=3e-4),
            Point("spo-a1-online-lr3e-4", online_every=5, lr=3e-4),
            Point("dpo-online-lr3e-4", loss="dpo", beta=0.1, online_every=5, lr=3e-4)]
    return {p.name: p for p in out}


def read_prompts(path: Path) -> list:
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]


def chat(prompts: list) -> list:
    return [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]


def build_data(point: Point, expert: str, seed: int, model, tokenizer, out: Path) -> Path:
    from softpo.prefs import build_preferences, write_jsonl
    from softpo.tasks.experts import load_scorer

    key = "_".join(str(x) for x in point.data_key)
    path = out / f"prefs_{expert}_s{seed}_{key}.jsonl"
    if path.is_file():
        return path
    scorer, _ = load_scorer(EXPERTS[expert], None)
    kw = {"keep_ties": True} if point.keep_ties else {}
    rows, stats = build_preferences(model, tokenizer, chat(read_prompts(TRAIN)), scorer, n=point.n,
                                    max_new_tokens=32, seed=seed, fmt=point.fmt,
                                    pairing=point.pairing, temperature=point.bt_temperature,
                                    pairs_per_prompt=point.pairs_per_prompt, progress=False, **kw)
    write_jsonl(path, rows)
    return path


def evaluate(model, tokenizer, reference, expert: str, seed: int) -> dict:
    from softpo.config import DataConfig
    from softpo.evaluation import evaluate_samples
    from softpo.tasks.experts import load_callable

    reward = load_callable(EXPERTS[expert])
    metrics, records = evaluate_samples(model, tokenizer, chat(read_prompts(HELDOUT)), DataConfig(),
                                        reference, 4, 32, seed=10_000 + seed, reward_fn=reward)
    out = metrics.as_dict()
    rewards = [r for _, _, r in records]
    out["reward_sd"] = statistics.pstdev(rewards)
    out["words"] = statistics.fmean(len(t.split()) for _, t, _ in records)
    return out


def train_overrides(point: Point, expert: str, seed: int, base_path: str, prefs: Path | str,
                    run_dir: Path, bf16: bool) -> list[str]:
    """The point's training run as overrides of configs/smollm2_lora.yaml."""
    return [f"model.name_or_path={base_path}", f"data.train={prefs}", f"loss.name={point.loss}",
            f"loss.alpha={point.alpha}", f"loss.beta={point.beta}", f"loss.gamma={point.gamma}",
            f"train.max_steps={point.steps}", f"optim.lr={point.lr}",
            f"train.output_dir={run_dir}", f"train.seed={seed}", "train.save_steps=0",
            "train.eval_steps=0", "train.progress=false", "train.report_to=[jsonl]",
            f"model.autocast_bf16={str(bf16).lower()}", *online_overrides(point, expert),
            *point.overrides]


def online_overrides(point: Point, expert: str) -> list[str]:
    """Online points: every `online_every` steps the current policy answers the next 40 training
    questions `n` times and the expert labels them as the offline points' data are labelled; the
    next steps train on those rows alone. 30 steps of 8 rows read 240 rows, the offline points'
    128 pairs about twice; the online run labels 240 questions' answers."""
    if not point.online_every:
        return []
    return ["online.enabled=true", f"online.expert={EXPERTS[expert]}", f"online.prompts={TRAIN}",
            "online.chat=true", f"online.responses={point.n}", "online.max_new_tokens=32",
            f"online.every={point.online_every}", "online.prompts_per_refresh=40",
            f"online.format={point.fmt}", f"online.pairing={point.pairing}",
            f"online.bt_temperature={point.bt_temperature}",
            f"online.pairs_per_prompt={point.pairs_per_prompt}", "online.buffer=1"]


def run_point(point: Point, expert: str, seed: int, base_path: str, out: Path) -> dict:
    import torch

    from softpo.config import ModelConfig, load_config
    from softpo.demo import precision_bf16  # bf16 autocast where this CPU/GPU has fast bf16
    from softpo.models import load_model, load_tokenizer
    from softpo.trainer import Trainer

    torch.manual_seed(seed)
    mcfg = ModelConfig(name_or_path=base_path)
    tokenizer = load_tokenizer(mcfg)
    base = load_model(mcfg, tokenizer, seed=seed).eval()
    t0 = time.perf_counter()
    if point.loss == "none":
        result = evaluate(base, tokenizer, None, expert, seed)
        result["kl"] = 0.0
        return result | {"seconds": round(time.perf_counter() - t0, 1)}
    prefs = "" if point.online_every else build_data(point, expert, seed, base, tokenizer, out)
    del base
    run_dir = out / "runs" / f"{expert}_s{seed}_{point.name}"
    cfg = load_config(ROOT / "configs" / "smollm2_lora.yaml", train_overrides(
        point, expert, seed, base_path, prefs, run_dir, precision_bf16()))
    trainer = Trainer(cfg)
    train_metrics = trainer.train()
    from softpo.tracking import read_metrics

    start = {k[len("start/"):]: v for row in read_metrics(run_dir / "metrics.jsonl")
             for k, v in row.items() if k.startswith("start/")}
    from softpo.logprobs import Reference

    policy = trainer.model.eval()
    result = evaluate(policy, trainer.tokenizer, Reference(policy, adapter_toggle=True), expert,
                      seed)
    result.update({f"train_{k}": v for k, v in train_metrics.items()
                   if k in ("pref_loss", "kl", "rewards/accuracies", "pref_saturated")})
    result.update({f"start_{k}": v for k, v in start.items()})
    return result | {"seconds": round(time.perf_counter() - t0, 1)}


def commit() -> str | None:
    """The repository's short commit, stored with every point (None outside a git checkout)."""
    import subprocess

    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True)
    return out.stdout.strip() or None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--expert", choices=sorted(EXPERTS), required=True)
    p.add_argument("--points", default=None, help="comma-separated point names (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "expert_study")
    p.add_argument("--json", action="store_true",
                   help="at the end, print one JSON object with the requested points' rows")
    a = p.parse_args(argv)
    import torch

    from softpo.models import fetch_default

    code = commit()  # the code this process runs, whatever is committed while it runs
    torch.set_num_threads(max(1, torch.get_num_threads()))
    base_path = str(fetch_default(progress=False))
    table = points()
    names = a.points.split(",") if a.points else list(table)
    a.out.mkdir(parents=True, exist_ok=True)
    log = a.out / "points.jsonl"
    done = {(r["expert"], r["seed"], r["point"]) for r in map(json.loads, log.read_text()
                                                               .splitlines())} if log.is_file() else set()
    for seed in a.seeds:
        for name in names:
            if (a.expert, seed, name) in done:
                continue
            result = run_point(table[name], a.expert, seed, base_path, a.out)
            row = {"expert": a.expert, "seed": seed, "point": name, "commit": code,
                   **vars(table[name]), **result}
            row["overrides"] = list(row["overrides"])
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{a.expert} seed {seed} {name:<18} reward {result['reward']:.3f} "
                  f"kl {result['kl']:.3f} entropy {result['entropy']:.2f} words "
                  f"{result['words']:.1f} ({result['seconds']:.0f} s)", flush=True,
                  file=sys.stderr if a.json else sys.stdout)
    if a.json:
        rows = [r for r in map(json.loads, log.read_text().splitlines())
                if r["expert"] == a.expert and r["seed"] in a.seeds and r["point"] in names]
        print(json.dumps({"points": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
