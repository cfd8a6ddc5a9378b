"""The command line's commands: each is a pair `<name>_arguments(parser)` / `<name>_command(args)`,
named in `softpo.cli.COMMANDS`. Argument parsing lives here and nowhere in the library; a command
reads its arguments, calls the library and prints.

Imports are inside the functions, so that `softpo --help` and a command's `--help` start without
loading torch or transformers.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from softpo.errors import UserError


def _prompt_config(max_prompt_length: int):
    """The `DataConfig` a command encodes prompts with (the one prompt encoder's settings)."""
    from softpo.config import DataConfig

    if max_prompt_length < 1:
        raise UserError(f"--max-prompt-length must be >= 1, got {max_prompt_length}")
    return DataConfig(max_prompt_length=max_prompt_length,
                      max_length=max(DataConfig.max_length, max_prompt_length + 1))


def _max_prompt_length_argument(p) -> None:
    from softpo.config import DataConfig

    p.add_argument("--max-prompt-length", type=int, default=DataConfig.max_prompt_length,
                   help="prompts keep their last this many tokens, as in training "
                   "(data.max_prompt_length; default %(default)s)")


# ---------------------------------------------------------------- softpo train

def train_arguments(p) -> None:
    """`softpo train CONFIG [OVERRIDES...] [--resume]`."""
    p.add_argument("config", help="YAML config (see docs/config.md)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.name=dpo loss.beta=0.1")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.epilog = ("SIGTERM or SIGINT: the current step finishes, a checkpoint is written, one line "
                "says where, and the exit code is 75; --resume continues exactly.")


def train_command(args) -> int:
    """Train from the config and overrides; print the final metrics and where the model is.
    Stopped by SIGTERM or SIGINT (`softpo.preemption`): exit code 75 after the checkpoint."""
    from softpo import checkpoint
    from softpo.config import load_config
    from softpo.errors import NonFiniteError
    from softpo.preemption import EXIT_PREEMPTED, Preempted
    from softpo.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    if args.resume:
        cfg.train.resume = True
    try:
        trainer = Trainer(cfg)
        metrics = trainer.train()
    except (NonFiniteError, checkpoint.CheckpointError) as e:
        raise UserError(str(e)) from None
    except Preempted:  # its line, saying where the checkpoint is, is printed already
        return EXIT_PREEMPTED
    if not trainer.acc.is_main_process:
        return 0
    keys = [k for k in ("loss", "rewards/accuracies", "eval_rewards/accuracies", "eval_pref_loss", "kl")
            if k in metrics]
    print("final: " + "  ".join(f"{k}={metrics[k]:.4f}" for k in keys))
    print(f"model saved to {Path(cfg.train.output_dir) / 'final'}")
    return 0


# ---------------------------------------------------------------- softpo eval

def eval_arguments(p) -> None:
    """`softpo eval MODEL --data FILE [--ref MODEL]`, `softpo eval MODEL --candidates FILE [...]`,
    or `softpo eval MODEL [MODEL...] --prompts FILE --expert module:function | --reward-model PATH
    [...]`."""
    p.add_argument("model", help="trained model folder (e.g. runs/x/final), hub name, tiny or default")
    p.add_argument("models", nargs="*", metavar="MODEL", help="more models to compare on the same "
                   "prompts and seeds (--prompts)")
    p.add_argument("--data", help="held-out preference file: preference accuracy")
    p.add_argument("--ref", help="reference model (--data: implicit-reward accuracy; --prompts: "
                   "KL to the reference)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-prompt-length", type=int, default=256)
    p.add_argument("--json", action="store_true")
    _eval_prompts_arguments(p)
    _eval_candidates_arguments(p)


def eval_command(args) -> int:
    """Preference accuracy (and, with a reference, implicit-reward accuracy) of a model; with
    --prompts, a generative evaluation with an expert (`_eval_prompts`)."""
    from softpo.collate import collate, pad_token_id, tokenize_examples
    from softpo.config import DataConfig, ModelConfig
    from softpo.data import load_preferences
    from softpo.evaluation import preference_accuracy
    from softpo.logprobs import Reference
    from softpo.models import load_model, load_tokenizer

    sources = [f"--{s}" for s in ("data", "candidates", "prompts") if getattr(args, s, None)]
    if len(sources) != 1:
        raise UserError("give exactly one of --data FILE, --candidates FILE or --prompts FILE"
                        + (f" (got {' and '.join(sources)})" if sources else ""))
    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    if args.prompts:
        return _eval_prompts(args)
    if args.models:
        raise UserError(f"{sources[0]} evaluates one model; compare several with --prompts")
    if args.candidates:
        return _eval_candidates(args)
    if not 0 < args.max_prompt_length < args.max_length:
        raise UserError("--max-prompt-length must be > 0 and < --max-length")
    dcfg = DataConfig(train=args.data, max_length=args.max_length,
                      max_prompt_length=args.max_prompt_length)
    mcfg = ModelConfig(name_or_path=args.model)
    tokenizer = load_tokenizer(mcfg)
    model = load_model(mcfg, tokenizer, seed=0).eval()
    reference = None
    if args.ref:
        ref = load_model(ModelConfig(name_or_path=args.ref), tokenizer, seed=0).eval()
        reference = Reference(ref, adapter_toggle=False)
    examples, report = load_preferences(args.data, dcfg)
    items = tokenize_examples(examples, tokenizer, dcfg, report)
    pad, bs = pad_token_id(tokenizer), args.batch_size
    batches = [collate(items[i:i + bs], pad) for i in range(0, len(items), bs)]
    result = preference_accuracy(model, batches, reference)
    print(json.dumps(result) if args.json else
          "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return 0


def _eval_prompts_arguments(p) -> None:
    """The generative evaluation's arguments (`softpo eval ... --prompts FILE`)."""
    g = p.add_argument_group("generative evaluation with an expert (--prompts)")
    g.add_argument("--prompts", help="held-out prompts: JSONL/JSON/CSV/Parquet with `prompt` (a "
                   "string or messages), or .txt one per line")
    g.add_argument("--chat", action="store_true", help="wrap string prompts as a user turn")
    g.add_argument("--expert", help="Python callable `module:function` (prompt, response) -> float")
    g.add_argument("--reward-model", help="sequence-classification reward model (folder or hub name)")
    g.add_argument("-n", "--num-samples", type=int, default=4, help="samples per prompt, K")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--success-threshold", type=float, default=1.0,
                   help="a sample with reward >= this is a success (default %(default)s: a right "
                   "answer for the shipped tasks)")
    g.add_argument("--temperature", type=float, default=1.0, help="1: pure sampling, as in "
                   "training (KL and entropy are measured only then)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every model")
    g.add_argument("--out", help="folder for samples.jsonl, summary.json and summary.md")
    g.add_argument("--no-progress", action="store_true")


def _eval_prompts(args) -> int:
    """Sample every model on the prompts, score with the expert, print one row per model."""
    from softpo.data import read_prompts
    from softpo.hardware import default_device
    from softpo.sampled_eval import (EvalSettings, evaluate_models, results_table, settings_line,
                                     summary_document, write_outputs)
    from softpo.tasks.experts import load_scorer

    checks = [(args.num_samples >= 1, "-n/--num-samples must be >= 1"),
              (args.max_new_tokens >= 1, "--max-new-tokens must be >= 1"),
              (math.isfinite(args.temperature) and args.temperature > 0,
               f"--temperature must be > 0, got {args.temperature}"),
              (math.isfinite(args.success_threshold), "--success-threshold must be a finite number"),
              (args.out is None or not Path(args.out).is_file(), f"--out must be a folder, got the "
               f"file '{args.out}'")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    settings = EvalSettings(k=args.num_samples, max_new_tokens=args.max_new_tokens, seed=args.seed,
                            temperature=args.temperature, success_threshold=args.success_threshold,
                            batch_size=args.batch_size,
                            data_cfg=_prompt_config(args.max_prompt_length))
    prompts = read_prompts(args.prompts)
    if args.chat:
        prompts = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
    device = default_device()
    scorer, described = load_scorer(args.expert, args.reward_model, device=device)
    names = [args.model, *args.models]
    summaries, records = evaluate_models(names, prompts, scorer, settings, args.ref, device,
                                         progress=not args.no_progress)
    data, markdown = summary_document(summaries, len(prompts), settings, described, args.ref,
                                      args.prompts)
    if args.out:
        write_outputs(args.out, records, data, markdown)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(settings_line(len(prompts), settings, described, args.ref))
        print(results_table(summaries, settings.k))
    if args.out:
        print(f"softpo: wrote {len(records)} samples and the summary to {args.out}", file=sys.stderr)
    return 0


CANDIDATE_COLUMNS = ("prompts", "success", "outside", "entropy", "kl_uniform", "coverage",
                     "top_share", "kl_expert", "reward")


def _eval_candidates_arguments(p) -> None:
    """The exact candidate-set evaluation's arguments (`softpo eval MODEL --candidates FILE`);
    --expert and --temperature are shared with --prompts."""
    g = p.add_argument_group("exact candidate-set evaluation (--candidates; also --expert, "
                             "--temperature)")
    g.add_argument("--candidates", help="rows {prompt, candidates, rewards} (softpo/candidates.py; "
                   "`softpo tasks candidates` writes them): every candidate's exact probability as "
                   "the whole response; --expert scores the rows that have no rewards")
    g.add_argument("--alpha", type=float, default=1.0,
                   help="kl_expert compares with the expert softmax(reward / alpha)")
    g.add_argument("--threshold", type=float, default=None,
                   help="candidates with reward >= this are correct (default: each prompt's best)")
    # softpo.candidates.LAYOUTS, named here so that `softpo eval --help` does not import torch
    g.add_argument("--layout", choices=("padded", "packed"), default="padded",
                   help="padded: a row per candidate; packed: a row per prompt, its prompt once")


def _eval_candidates(args) -> int:
    """Every candidate's exact probability at --temperature; print the means over prompts (or,
    with --json, one object with them and every candidate's text, prob and reward)."""
    from softpo.candidates import evaluate_candidates, read_candidates
    from softpo.config import ModelConfig
    from softpo.hardware import default_device
    from softpo.models import load_model, load_tokenizer

    checks = [(args.ref is None, "--ref is not used with --candidates"),
              (math.isfinite(args.alpha) and args.alpha > 0,
               f"--alpha must be > 0, got {args.alpha}"),
              (math.isfinite(args.temperature) and args.temperature > 0,
               f"--temperature must be > 0, got {args.temperature}"),
              (args.threshold is None or math.isfinite(args.threshold),
               f"--threshold must be a finite number, got {args.threshold}")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    device = default_device()
    scorer = None
    if args.expert or args.reward_model:
        from softpo.tasks.experts import load_scorer

        scorer, _ = load_scorer(args.expert, args.reward_model, device=device)
    rows = read_candidates(args.candidates, scorer)
    cfg = ModelConfig(name_or_path=args.model)
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, tokenizer, seed=0).to(device).eval()
    report = evaluate_candidates(model, tokenizer, rows, alpha=args.alpha, threshold=args.threshold,
                                 temperature=args.temperature, layout=args.layout)
    if args.json:
        print(json.dumps({"model": args.model, "candidates": args.candidates,
                          "temperature": args.temperature, "alpha": args.alpha,
                          "threshold": args.threshold, **report.as_dict()}))
        return 0
    correct = "reward >= each prompt's best" if args.threshold is None else \
        f"reward >= {args.threshold:g}"
    print(f"{args.model} on {args.candidates}: temperature {args.temperature:g}, expert "
          f"softmax(r / {args.alpha:g}), correct: {correct}; means over prompts")
    print(_table(CANDIDATE_COLUMNS, report.summary))
    return 0


def _table(columns: tuple[str, ...], values: dict) -> str:
    """Two aligned lines: the column names and the values (4 decimals; counts as integers)."""
    cells = [f"{values[c]:.0f}" if c == "prompts" else
             f"{values[c]:.4f}" if c in values else "-" for c in columns]
    widths = [max(len(c), len(v)) for c, v in zip(columns, cells)]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(line, widths))
                     for line in (columns, cells))


# ---------------------------------------------------------------- softpo sample

def sample_arguments(p) -> None:
    """`softpo sample MODEL --prompt TEXT | --prompts FILE`."""
    p.add_argument("model", help="model folder or hub name, `tiny` or `default`")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", help="prompt file (JSONL with `prompt`, or .txt one per line)")
    p.add_argument("-n", "--num-samples", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap plain prompts as a user turn")
    p.add_argument("--out", help="write the samples to this .jsonl file instead of printing them: "
                   "one object {prompt, response, finished, tokens} per sample (finished: it ended "
                   "with an end-of-sequence token; tokens: sampled tokens, that one included)")
    _max_prompt_length_argument(p)


def sample_command(args) -> int:
    """Print k samples per prompt (or write them to --out), prompts encoded as training encodes
    them."""
    from softpo.config import ModelConfig
    from softpo.data import read_prompts
    from softpo.models import load_model, load_tokenizer
    from softpo.sampling import sample_prompts

    prompts = list(args.prompt) + (read_prompts(args.prompts) if args.prompts else [])
    if not prompts:
        raise UserError("give at least one --prompt or a --prompts file")
    if args.num_samples < 1 or args.max_new_tokens < 1:
        raise UserError("--num-samples and --max-new-tokens must be >= 1")
    if args.out is not None and not args.out.endswith(".jsonl"):
        raise UserError(f"--out must end in .jsonl, got '{args.out}'")
    data_cfg = _prompt_config(args.max_prompt_length)
    if args.chat:
        prompts = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
    cfg = ModelConfig(name_or_path=args.model)
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, tokenizer, seed=args.seed)
    batch = sample_prompts(model, tokenizer, prompts, data_cfg, args.num_samples,
                           args.max_new_tokens, args.seed)
    texts = batch.texts(tokenizer)
    if args.out is None:
        for i, text in enumerate(texts):
            print(f"[{i // args.num_samples}.{i % args.num_samples}] {text}")
        return 0
    from softpo.prefs import write_jsonl

    k = args.num_samples
    write_jsonl(Path(args.out), [{"prompt": prompts[i // k], "response": text,
                                  "finished": bool(batch.finished[i]),
                                  "tokens": int(batch.response_lengths[i])}
                                 for i, text in enumerate(texts)])
    print(f"softpo: wrote {len(texts)} samples of {len(prompts)} prompts to {args.out}",
          file=sys.stderr)
    return 0


# ---------------------------------------------------------------- softpo losses

def losses_arguments(p) -> None:
    """`softpo losses [--kind KIND] [--module MODULE]`."""
    p.add_argument("--kind", choices=["pairs", "best_of_n", "ranked"], default=None,
                   help="only losses that read this data kind")
    p.add_argument("--module", help="import this module first (it registers more losses), as "
                   "the config key loss.module does")


def losses_command(args) -> int:
    """Print the registered losses and KL estimators."""
    from softpo.config import import_problem
    from softpo.losses import KL_ESTIMATORS, LOSSES

    if args.module and (problem := import_problem(args.module)):
        raise UserError(f"--module: {problem}")
    specs = [s for s in LOSSES.values() if args.kind in (None, s.data_kind)]
    print(f"{'loss':<15} {'data':<10} {'ref':<4} {'spo':<4} summary")
    for s in specs:
        print(f"{s.name:<15} {s.data_kind:<10} {'yes' if s.needs_ref else 'no':<4} "
              f"{'yes' if s.is_spo else 'no':<4} {s.summary}")
    print("\nKL estimators (regularizer.estimator):")
    for name, fn in KL_ESTIMATORS.items():
        print(f"  {name:<9} {(fn.__doc__ or '').strip().splitlines()[0]}")
    return 0


# ---------------------------------------------------------------- softpo data check

def data_check_arguments(p) -> None:
    """`softpo data check FILE...`."""
    from softpo.config import DataConfig

    d = DataConfig()
    p.add_argument("files", nargs="+", metavar="FILE", help="preference files, folders or hub names")
    p.add_argument("--tokenizer", help="tokenizer name or path (`tiny`: the built-in byte "
                   "tokenizer) for token-length statistics and truncation counts")
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--max-prompt-length", type=int, default=d.max_prompt_length)
    p.add_argument("--chat-template", choices=("auto", "never"), default=d.chat_template)
    p.add_argument("--split", default=d.split, help="split of HF datasets")
    p.add_argument("--skip-bad-rows", action="store_true", help="count bad rows instead of "
                   "stopping at the first")
    p.add_argument("--no-cache", action="store_true", help="with --tokenizer: tokenise again "
                   "instead of reading (and writing) the tokenised rows a run keeps on disk "
                   "(data.cache_tokens)")


def data_check_command(args) -> int:
    """Validate each source and print its report; exit code 2 if any failed. With a tokenizer,
    the rows are tokenised as a run tokenises them, through the same on-disk cache."""
    from softpo.config import DataConfig
    from softpo.data import load_preferences

    cfg = DataConfig(max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                     on_bad_rows="skip" if args.skip_bad_rows else "error",
                     chat_template=args.chat_template, split=args.split,
                     cache_tokens=not args.no_cache)
    if not 0 < cfg.max_prompt_length < cfg.max_length:
        raise UserError("--max-prompt-length must be > 0 and < --max-length")
    tokenizer = _check_tokenizer(args.tokenizer) if args.tokenizer else None
    failed = False
    for source in args.files:
        try:
            if tokenizer is None:
                _, report = load_preferences(source, cfg)
            else:
                from softpo.collate import collect
                from softpo.tokcache import load_tokenized

                src = load_tokenized(source, tokenizer, cfg)
                report = src.report
                collect(src.results, cfg, report)
            print(report.summary())
        except UserError as e:
            print(f"softpo: error: {e}", file=sys.stderr)
            failed = True
    return 2 if failed else 0


def _check_tokenizer(name: str):
    """`tiny`: softpo's byte-level tokenizer; `default`, a local folder or a (cached) hub name."""
    try:
        from softpo.config import ModelConfig
        from softpo.models import load_tokenizer
    except ImportError as e:
        raise UserError(f"cannot load tokenizer '{name}': {e}") from None
    return load_tokenizer(ModelConfig(name_or_path=name))


# ---------------------------------------------------------------- softpo models fetch-default

def fetch_default_arguments(p) -> None:
    """`softpo models fetch-default [--force]`."""
    p.add_argument("--force", action="store_true", help="convert again even if the folder exists")


def fetch_default_command(args) -> int:
    """Convert the embedded SmolLM2 GGUF into the cache (once) and print the folder."""
    from softpo.models import fetch_default

    print(fetch_default(force=args.force))
    return 0


# ---------------------------------------------------------------- softpo build-prefs

def build_prefs_arguments(p) -> None:
    """`softpo build-prefs --prompts FILE | --task NAME --out FILE.jsonl ...`."""
    from softpo.prefs import FORMATS, PAIRINGS

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
    _max_prompt_length_argument(src)
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
                   help="bt pairs per prompt among responses with different rewards (with "
                   "--keep-ties: among all pairs; 0: all)")
    p.add_argument("--keep-ties", action="store_true",
                   help="compare tied responses too, labelled by a fair coin (Bradley-Terry at "
                   "equal rewards): bt draws among all pairs, best-worst adds a pair of two tied "
                   "best responses, all-tie prompts give rows (softpo/prefs.py)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts sampled together")
    p.add_argument("--out", required=True, help="output JSONL (a .summary.json is written beside)")
    p.add_argument("--no-progress", action="store_true")


def _check_build_prefs(args) -> None:
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
    """Sample, score and label; write the rows and a summary beside them."""
    from softpo.config import ModelConfig
    from softpo.hardware import default_device
    from softpo.models import load_model, load_tokenizer
    from softpo.prefs import build_preferences, summary_path, write_atomic, write_jsonl
    from softpo.tasks.experts import load_scorer

    _check_build_prefs(args)
    data_cfg = _prompt_config(args.max_prompt_length)
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
        progress=not args.no_progress, data_cfg=data_cfg, keep_ties=args.keep_ties)
    elapsed = time.perf_counter() - began
    if not rows:
        raise UserError(f"no rows: the responses to all {stats.prompts} prompts tied or were too "
                        "few (try more -n or a longer --max-new-tokens)")
    out = Path(args.out)
    write_jsonl(out, rows)
    summary = {"out": str(out), "model": args.model, "expert": described, "format": args.format,
               "pairing": args.pairing, "bt_temperature": args.bt_temperature,
               "keep_ties": args.keep_ties,
               "num_responses": args.num_responses, "max_new_tokens": args.max_new_tokens,
               "max_prompt_length": args.max_prompt_length, "seed": args.seed,
               "prompt_source": args.prompts or f"task {args.task}:{args.split}",
               **stats.summary(threshold), "seconds": round(elapsed, 2)}
    write_atomic(summary_path(out), json.dumps(summary, indent=2) + "\n")
    print(f"softpo: wrote {stats.rows} {args.format} rows from {stats.prompts} prompts to {out} "
          f"(reward mean {summary['reward_mean']:.3f}; skipped {stats.skipped_ties} all-tie and "
          f"{stats.skipped_too_few} too-few prompts; {elapsed:.1f}s)", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- softpo tasks candidates

def tasks_candidates_arguments(p) -> None:
    """`softpo tasks candidates --task choices [--split test] [-n 64] [--seed 0] --out FILE.jsonl`."""
    p.add_argument("--task", default="choices", help="a task with candidate sets: choices, "
                   "choices-numbers or choices-words (default %(default)s)")
    p.add_argument("--split", default="test", help="train or test (default %(default)s)")
    p.add_argument("-n", "--num-prompts", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .jsonl, rows {prompt, candidates, rewards} "
                   "for `softpo eval MODEL --candidates FILE`")


def tasks_candidates_command(args) -> int:
    """Write the task's prompts with every candidate answer and its reward."""
    from softpo.prefs import write_jsonl
    from softpo.tasks import TASKS, get_task

    task = get_task(args.task)  # a UserError names the known tasks
    if task.candidate_rows is None:
        with_sets = [n for n in TASKS if get_task(n).candidate_rows is not None]
        raise UserError(f"task '{args.task}' has no candidate sets (these have: "
                        f"{', '.join(with_sets)})")
    if args.num_prompts < 1:
        raise UserError(f"-n/--num-prompts must be >= 1, got {args.num_prompts}")
    if not args.out.endswith(".jsonl"):
        raise UserError(f"--out must end in .jsonl, got '{args.out}'")
    rows = task.candidate_rows(args.split, args.num_prompts, args.seed)
    write_jsonl(Path(args.out), rows)
    correct = sum(r >= task.success_threshold for row in rows for r in row["rewards"]) / len(rows)
    size = sum(len(row["candidates"]) for row in rows) / len(rows)
    print(f"softpo: wrote {len(rows)} {args.task}:{args.split} prompts to {args.out} ({size:.1f} "
          f"candidates, {correct:.1f} correct on average)", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- softpo export

def export_arguments(p) -> None:
    """`softpo export RUN_OR_MODEL OUT [--merge]`."""
    p.add_argument("source", metavar="RUN_OR_MODEL", help="run directory (its final/ is exported) "
                   "or model folder")
    p.add_argument("out", metavar="OUT", help="new folder to write")
    p.add_argument("--merge", action="store_true", help="merge a LoRA adapter into the base "
                   "weights (a plain model); without it an adapter is exported with its base named")


def export_command(args) -> int:
    """Export; print where the folder is and how it loads."""
    from softpo.export import export

    out = export(args.source, args.out, merge=args.merge)
    print(f"exported to {out} (loads with AutoModelForCausalLM.from_pretrained)")
    return 0


# ---------------------------------------------------------------- softpo demo

def demo_arguments(p) -> None:
    """`softpo demo [--sweep]` and the settings it varies."""
    from softpo.demo import SWEEP, DemoSettings

    d = DemoSettings()
    p.add_argument("--out", default=d.out)
    p.add_argument("--model", default=d.model, help="`default` (embedded SmolLM2-135M-Instruct), a "
                   "hub name or folder, or `tiny` for a quick smoke run")
    p.add_argument("--task", default=d.task, help="shipped task family (softpo.tasks.TASKS; "
                   "default %(default)s; arithmetic-compare: the original one-answer demo)")
    p.add_argument("--sweep", action="store_true", help="the whole frontier: list flags not given "
                   "take the sweep's values " + ", ".join(f"--{k.replace('_', '-')} "
                                                          f"{' '.join(map(str, v))}"
                                                          for k, v in SWEEP.items()))
    for name in ("train_prompts", "eval_prompts", "max_new_tokens", "steps", "batch_size"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--responses", type=int, help="sampled per training prompt (default: the "
                   "task's, 8 for choices, 4 for arithmetic)")
    p.add_argument("--eval-samples", type=int, help="k sampled per held-out prompt (default: the "
                   "task's, 8 for choices, 4 for arithmetic)")
    for name in ("lr", "spo_beta", "peer_beta"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    for name in ("alphas", "dpo_betas", "hdpo_alphas", "temperatures"):
        p.add_argument("--" + name.replace("_", "-"), type=float, nargs="*",
                       help=f"default {' '.join(map(str, getattr(d, name))) or 'none'}")
    p.add_argument("--f-divergences", nargs="*", help="f-DPO divergences: forward_kl, "
                   "js_divergence (default none)")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, help="one seed (default 0)")
    seeds.add_argument("--seeds", type=int, nargs="+", help="several seeds: a run per seed in "
                       "OUT/seed<S>/ and their means (default with --sweep: 0 1 2)")
    p.add_argument("--no-progress", action="store_true")


DEMO_LISTS = ("alphas", "dpo_betas", "hdpo_alphas", "temperatures", "f_divergences")


def demo_command(args) -> int:
    """Run the demo (softpo/demo.py) and print its table."""
    from softpo.demo import DemoSettings, run, sweep_settings
    from softpo.demo_report import results_table
    from softpo.errors import NonFiniteError

    given = {k: getattr(args, k) for k in DEMO_LISTS if getattr(args, k) is not None}
    if args.seed is not None or args.seeds is not None:
        given["seeds"] = [args.seed] if args.seed is not None else args.seeds
    fixed = {k: getattr(args, k) for k in ("out", "model", "task", "train_prompts", "eval_prompts",
                                            "responses", "eval_samples", "max_new_tokens", "steps",
                                            "batch_size", "lr", "spo_beta", "peer_beta")}
    s = sweep_settings(**fixed, **given) if args.sweep else DemoSettings(**fixed, **given)
    s.progress = not args.no_progress
    t0 = time.perf_counter()
    try:
        doc = run(s)
    except NonFiniteError as e:  # a method diverged: the trainer says which step and why
        raise UserError(str(e)) from None
    print()
    print(results_table(doc))
    print(f"\nreport: {Path(s.out) / 'results.md'}  ({time.perf_counter() - t0:.0f} s)")
    return 0
