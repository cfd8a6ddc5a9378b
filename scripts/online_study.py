"""Online against offline SPO on the demo's task, with the same expert calls and optimiser steps.

    python scripts/online_study.py --seed 0 --out runs/online_study --json

Both runs start from the embedded SmolLM2-135M-Instruct, train the same LoRA adapter with SPO
(the demo's training settings: `softpo.demo.run_config`) for the same number of steps, and see the
same 64 training questions of `choices-words`, 8 answers each, labelled by the task's expert into
Bradley-Terry pairs (every pair, temperature 0.1, ties by a fair coin):

- offline: the reference answers all 64 questions once, before training (`softpo build-prefs`);
- online: at steps 0, 5, 10 and 15 the current policy answers the next 16 of the 64 questions
  (`online.every=5`, `online.prompts_per_refresh=16`, `online.buffer=1`), and the next 5 steps
  train on those rows only.

The expert scores each distinct answer once in both runs (the counts are reported). Every model is
measured as `softpo demo` measures it, on the seed's 32 held-out questions: exact success
probability, mass outside the candidate answers and entropy among the right ones, and sampled
pass@k and sequence KL to the reference. One JSON object on stdout with `--json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STEPS, EVERY, PROMPTS, RESPONSES = 20, 5, 64, 8


def settings(alpha: float, out: Path):
    from softpo.demo import DemoSettings

    return DemoSettings(out=str(out), train_prompts=PROMPTS, responses=RESPONSES, steps=STEPS,
                        alphas=[alpha], progress=False)


def online_config(s, h, model_path: str, point, prompts_file: Path, out: Path):
    """The demo's training config with no offline data and an `online` section."""
    from softpo.demo import recipe_for, run_config

    cfg = run_config(s, model_path, prompts_file, point, h.seed, out)
    cfg.data.train = ""
    r, o = recipe_for(s), cfg.online
    o.enabled, o.expert, o.prompts, o.chat = True, h.task.reward_spec, str(prompts_file), False
    o.responses, o.max_new_tokens, o.every, o.start = r.responses, s.max_new_tokens, EVERY, 0
    o.prompts_per_refresh, o.buffer, o.mix = PROMPTS * EVERY // STEPS, 1, "replace"
    o.format, o.pairing, o.bt_temperature = "pairs", r.pairing, r.bt_temperature
    o.pairs_per_prompt, o.keep_ties = r.pairs_per_prompt, r.keep_ties
    return cfg


def train_measure(h, point, cfg, name: str) -> tuple[dict, list[dict]]:
    from softpo.demo import TRAIN_KEYS
    from softpo.demo_eval import measure
    from softpo.logprobs import Reference
    from softpo.tracking import read_metrics
    from softpo.trainer import Trainer

    trainer = Trainer(cfg)
    final = trainer.train()
    policy = trainer.model.eval()
    entry = measure(h, point, policy, Reference(policy, adapter_toggle=True),
                    {k: final[k] for k in TRAIN_KEYS if k in final})
    entry["name"] = name
    return entry, read_metrics(Path(cfg.train.output_dir) / "metrics.jsonl")


def run(seed: int, alpha: float, out: Path, model: str = "default") -> dict:
    import torch

    from softpo.config import ModelConfig
    from softpo.demo import build_data, harness
    from softpo.demo_eval import Point, measure
    from softpo.hardware import default_device
    from softpo.models import fetch_default, load_model, load_tokenizer, save_pretrained_atomic
    from softpo.prefs import write_jsonl

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    model_path = str(fetch_default(progress=False)) if model == "default" else model
    mcfg = ModelConfig(name_or_path=model_path)
    tokenizer = load_tokenizer(mcfg)
    base = load_model(mcfg, tokenizer, seed=seed).eval().to(default_device())
    if model_path == "tiny":  # a smoke run: fresh tiny weights, saved for the trainings
        model_path = str(save_pretrained_atomic(base, tokenizer, out / "tiny_model"))
    s = settings(alpha, out)
    torch.manual_seed(seed)
    h = harness(s, seed, out, tokenizer, model_path)
    prefs, data = build_data(s, h, base)  # the 64 questions x 8 answers of the reference
    prompts_file = out / "online_prompts.jsonl"  # the same 64 questions, for the online run
    write_jsonl(prompts_file, [{"prompt": p} for p in h.task.make_prompts("train", PROMPTS, seed)])
    point = Point("spo", alpha=alpha, beta=s.spo_beta)
    models = [measure(h, Point(), base, None, None)]
    del base
    from softpo.demo import run_config

    offline, _ = train_measure(h, point, run_config(s, model_path, prefs, point, seed,
                                                    out / "offline"), "spo_offline")
    offline["expert_calls"] = data["distinct"]
    online, metrics = train_measure(h, point, online_config(s, h, model_path, point, prompts_file,
                                                            out / "online"), "spo_online")
    refreshes = [m for m in metrics if "online/rows" in m]
    online["expert_calls"] = int(sum(m["online/expert_calls"] for m in refreshes))
    online["refreshes"] = [{"step": m["step"], "rows": int(m["online/rows"]),
                            "reward_mean": m.get("online/reward_mean")} for m in refreshes]
    return {"seed": seed, "alpha": alpha, "beta": s.spo_beta, "steps": STEPS, "every": EVERY,
            "prompts": PROMPTS, "responses": RESPONSES, "offline_rows": data["rows"],
            "models": models + [offline, online], "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alpha", type=float, default=0.25)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "online_study")
    p.add_argument("--model", default="default", help="`default` (SmolLM2) or `tiny` (a smoke run)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    res = run(a.seed, a.alpha, a.out / f"seed{a.seed}", a.model)
    if a.json:
        print(json.dumps(res))
        return 0
    for m in res["models"]:
        ex, sa = m["metrics"]["exact"], m["metrics"]["sampled"]
        print(f"{m['name']:<12} success {ex['success']:.3f} outside {ex['outside']:.3f} entropy "
              f"{ex['entropy']:.3f} pass@8 {sa.get('pass@8', float('nan')):.3f} kl "
              f"{sa.get('kl', float('nan')):.3f} expert calls {m.get('expert_calls', '-')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
