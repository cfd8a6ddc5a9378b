"""Configuration: nested dataclasses documented once, YAML files of overrides, dotted CLI overrides.

Every field carries its documentation in `metadata["help"]`; `docs/config.md` is generated from it
(`python -m softpo.config > docs/config.md`). A run directory always receives the resolved config as
`config.yaml`. Unknown keys and out-of-range values raise `UserError` naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from softpo.errors import UserError

PACKINGS = ("none", "padding_free", "shared_prompt")
FORMATS = ("pairs", "best_of_n", "ranked")  # rows an expert's labels are written as
PAIRINGS = ("bt", "best-worst")  # how an expert's rewards become labels (softpo.prefs)
MIXES = ("replace", "append")  # online rows and the offline data


def doc(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its documentation."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class TinyModelConfig:
    """Shape of the locally built model used when `model.name_or_path: tiny` (no download)."""

    n_layer: int = doc(2, "Transformer blocks.")
    n_embd: int = doc(64, "Hidden size.")
    n_head: int = doc(4, "Attention heads.")
    n_positions: int = doc(512, "Maximum sequence length.")
    architecture: str = doc("llama", "`llama` (LlamaForCausalLM) or `gpt2` (GPT2LMHeadModel).")


@dataclass
class ModelConfig:
    """The policy model, its tokenizer and the reference."""

    name_or_path: str = doc("tiny", "Hub name or local folder of a causal LM; `tiny` builds a small "
                            "model with a byte-level tokenizer locally; `default` is the cached "
                            "SmolLM2-135M-Instruct (see `softpo models fetch-default`).")
    tokenizer: str | None = doc(None, "Tokenizer name or path when it differs from the model's.")
    ref_name_or_path: str | None = doc(None, "Reference model; defaults to the initial policy.")
    dtype: str = doc("float32", "Parameter dtype: `float32` or `bfloat16`.")
    autocast_bf16: bool = doc(False, "Run forwards under bf16 autocast (master weights stay in dtype).")
    trust_remote_code: bool = doc(False, "Allow model code from the hub. Off unless you turn it on.")
    gradient_checkpointing: bool = doc(False, "Recompute activations in backward to save memory.")
    attn_implementation: str | None = doc(None, "`eager`, `sdpa`, ...; None lets transformers choose.")
    packing: str = doc("none", "Layout of a preference example in the forward pass. `none`: one "
                       "padded row per response, [prompt, response]. `padding_free`: the same "
                       "[prompt, response] sequences packed back to back into rows of "
                       "`model.pack_tokens`, kept apart by a 4-D attention mask (no compute on "
                       "padding). `shared_prompt`: one unit per example, [prompt, response_1, ..., "
                       "response_n], so each response sees the prompt and itself only and the "
                       "prompt is computed once instead of n times; units are packed the same way. "
                       "Same log-probs in every layout; the packed ones need attn_implementation "
                       "`sdpa` or `eager` and a plain linear output layer.")
    full_logits: bool = doc(False, "Score the preference rows from the whole [rows, T, vocab] "
                            "logits in one padded block, as TRL does, instead of the default "
                            "response-only output layer in chunks recomputed in backward with "
                            "length groups. The same log-probs; on an H200 at 32 pairs of <= 512 "
                            "tokens an SPO step ran 4.4x faster for 1.8x the GPU memory "
                            "(docs/benchmarks.md); on CPUs slower and larger. Needs "
                            "`model.packing=none`; the regulariser's samples are scored as before.")
    pack_tokens: int = doc(0, "Packed layouts: length of a packed row (a sequence longer than "
                           "that gets a row of its own; sequences are never split). 0: twice the "
                           "batch's longest [prompt, response] row.")
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class LoraConfig:
    """LoRA adapters (PEFT). With LoRA the reference is the same model with the adapter disabled."""

    enabled: bool = doc(False, "Train a LoRA adapter (PEFT); the reference is the adapter disabled.")
    r: int = doc(16, "LoRA rank.")
    alpha: int = doc(32, "LoRA scaling numerator (lora_alpha).")
    dropout: float = doc(0.0, "LoRA dropout.")
    target_modules: list[str] | str = doc("all-linear", "Module names to adapt, or `all-linear`.")


@dataclass
class DataConfig:
    """Preference data, truncation and the regulariser's prompt set (see `softpo data check`)."""

    train: str = doc("", "Training preferences: JSONL/JSON/CSV/Parquet file, a local HF dataset "
                     "folder, or a hub dataset name (`name` or `name:split`).")
    eval: str | None = doc(None, "Held-out preferences (same formats). None: split off `eval_fraction`.")
    eval_fraction: float = doc(0.1, "Fraction of train held out when `eval` is not given (0 disables).")
    split: str = doc("train", "Split for HF datasets when the source does not name one.")
    max_length: int = doc(512, "Max tokens of prompt + response. A prompt of max_length tokens or "
                          "more is a bad row; otherwise responses are cut to fit (counted in the "
                          "data report, never dropped silently).")
    max_prompt_length: int = doc(256, "Max prompt tokens; longer prompts keep their last tokens.")
    on_bad_rows: str = doc("error", "`error`: the first bad row stops with its file, row and field; "
                           "`skip`: bad rows are skipped, counted and reported.")
    chat_template: str = doc("auto", "`auto`: conversational rows use the tokenizer's chat template; "
                             "`never`: render conversations as plain text.")
    cache_tokens: bool = doc(True, "Keep each source's tokenised rows on disk "
                             "(`$SOFTPO_CACHE/tokens`, default ~/.cache/softpo/tokens), keyed by "
                             "the data's content, the tokenizer (its full serialised state, chat "
                             "template and special tokens), the settings above that change the "
                             "tokens and the code that reads and tokenises, so that a restart or a "
                             "second run reads them instead of tokenising again (see "
                             "softpo/tokcache.py). `false`: always tokenise.")
    regularizer_prompts: str | None = doc(None, "Prompt file (JSONL with `prompt`, or .txt one per "
                                          "line) for the global KL; default: the training prompts.")


@dataclass
class LossConfig:
    """The loss from the registry and its hyper-parameters (`softpo losses` lists the losses)."""

    name: str = doc("spo", "Loss from the registry: spo, spo_best_of_n, spo_ranked, dpo, ipo, rdpo, "
                    "cdpo, robust_dpo, hinge, simpo, cpo, orpo, hdpo, fdpo (`softpo losses` lists "
                    "them), or one that `loss.module` registers.")
    module: str | None = doc(None, "Python module imported before `loss.name` is looked up, e.g. "
                             "`mypkg.losses`: it adds losses with `softpo.losses.register` "
                             "(see docs/python.md). Installed modules first, then the working "
                             "directory.")
    alpha: float = doc(1.0, "SPO softness: the optimum is softmax(reward / alpha). H-DPO (hdpo): "
                       "the entropy coefficient, optimum (pi_ref exp(reward / beta))^(1/alpha) "
                       "(1 is DPO). Must be > 0.")
    beta: float = doc(0.1, "SPO: weight of the global KL regulariser (0 turns it off). DPO family: "
                      "the inverse temperature beta. ORPO: lambda.")
    gamma: float = doc(0.0, "Weighted SPO: sharpness of the weights mu (0 gives mu = 1).")
    label_smoothing: float = doc(0.0, "Robust/conservative DPO: probability a label is flipped.")
    simpo_gamma: float = doc(0.5, "SimPO target reward margin gamma.")
    cpo_alpha: float = doc(1.0, "CPO weight of the behaviour-cloning (NLL) term.")
    rdpo_alpha: float = doc(0.0, "R-DPO length penalty coefficient.")
    f_divergence: str = doc("reverse_kl", "f-DPO (fdpo): the divergence to the reference, as TRL's "
                            "f_divergence_type: reverse_kl (DPO), forward_kl or js_divergence.")
    precompute_ref_logps: bool = doc(False, "Reference-based losses (dpo, ipo, ...): compute the "
                                     "reference log-probs of every train/eval response once before "
                                     "training and read them from a cache instead of running the "
                                     "reference forward each step; the separate reference model is "
                                     "then freed unless the regulariser needs it (see "
                                     "softpo/refcache.py).")
    ref_cache_dir: str | None = doc(None, "Folder of cached reference log-probs (safetensors, keyed "
                                    "by the reference weights, precision and the tokenised data). "
                                    "None: `$SOFTPO_CACHE/ref_logps` (default ~/.cache/softpo).")


@dataclass
class RegularizerConfig:
    """SPO's global KL regulariser KL(pi || pi_ref), estimated on fresh samples from the policy at temperature 1. Active for SPO losses when `loss.beta > 0`."""

    estimator: str = doc("token", "Global KL estimator on fresh samples: `token` (exact per-position KL "
                         "along sampled prefixes; low variance), `seq` (score function with "
                         "leave-one-out baseline; unbiased) or `token_sf` (token + score-function "
                         "correction; unbiased).")
    prompts_per_step: int = doc(4, "Prompts sampled for the regulariser each refresh (per process).")
    samples_per_prompt: int = doc(2, "Fresh responses per prompt (>= 2 for the leave-one-out baseline).")
    max_new_tokens: int = doc(32, "Length cap of sampled responses.")
    sample_every: int = doc(1, "Draw fresh samples every this many optimiser steps.")


@dataclass
class OnlineConfig:
    """Online SPO: every `every` steps the current policy answers new prompts, an expert scores the answers and labels them into preference rows (as `softpo build-prefs` does), and the following steps train on them (docs/experts.md, "Online SPO")."""

    enabled: bool = doc(False, "Turn online refreshes on.")
    expert: str | None = doc(None, "The expert as `module:function`, `reward(prompt, response) -> "
                             "float`, higher is better (exactly one of `expert` and "
                             "`reward_model`).")
    reward_model: str | None = doc(None, "Or a sequence-classification reward model with one "
                                   "output (folder or hub name; safetensors weights only).")
    prompts: str | None = doc(None, "Prompt file (JSONL with `prompt`, or .txt one per line); "
                              "default: the training data's prompts. Needed when `data.train` is "
                              "empty.")
    chat: bool = doc(False, "Wrap string prompts as one user message (as `build-prefs --chat`), so "
                     "a chat model answers them through its chat template.")
    responses: int = doc(4, "Responses sampled per prompt (pure sampling at temperature 1), >= 2.")
    max_new_tokens: int = doc(32, "Length cap of sampled responses.")
    every: int = doc(10, "Refresh every this many optimiser steps.")
    start: int = doc(0, "Step of the first refresh (then `start + every`, ...). Must be 0 when "
                     "`data.train` is empty.")
    prompts_per_refresh: int = doc(16, "Prompts answered at each refresh, in all (the processes "
                                   "share them); the next ones of a seeded stream over the "
                                   "prompt set.")
    sample_batch: int = doc(8, "Prompts per sampling call. Groups of this many prompts are the "
                            "unit the processes share out, each sampled with its own seed, so N "
                            "processes draw exactly what one process draws.")
    format: str = doc("pairs", "Row format: `pairs`, `best_of_n` or `ranked` (as `build-prefs "
                      "--format`); the loss must read it.")
    pairing: str = doc("bt", "Labels: `bt` (drawn from Bradley-Terry / Luce / Plackett-Luce at "
                       "`bt_temperature`) or `best-worst` (deterministic), as `build-prefs "
                       "--pairing`.")
    bt_temperature: float = doc(1.0, "Temperature T of the `bt` labels, P(a > b) = "
                                "sigmoid((r_a - r_b) / T); > 0.")
    pairs_per_prompt: int = doc(1, "`bt` pairs: pairs drawn per prompt (0: all pairs).")
    keep_ties: bool = doc(False, "Compare tied responses by a fair coin instead of skipping them "
                          "(as `build-prefs --keep-ties`).")
    mix: str = doc("replace", "The offline data once the first refresh has happened. `replace`: "
                   "batches come from the online pool alone (data.train is read before "
                   "`start` only); `append`: from data.train and the online pool together, "
                   "uniformly.")
    buffer: int = doc(1, "Refreshes whose rows make up the online pool: 1 keeps only the newest "
                      "rows (on-policy), k the last k refreshes, 0 every refresh so far. A "
                      "refresh that yields no row does not push older rows out.")


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = doc(5e-6, "Peak learning rate (AdamW).")
    weight_decay: float = doc(0.0, "AdamW weight decay.")
    adam_betas: list[float] = doc([0.9, 0.999], "AdamW betas.")
    adam_eps: float = doc(1e-8, "AdamW epsilon.")
    scheduler: str = doc("cosine", "`cosine`, `linear` or `constant` after warmup.")
    warmup_steps: int = doc(0, "Linear warmup steps.")
    max_grad_norm: float = doc(1.0, "Gradient clipping norm (0 disables).")


@dataclass
class TrainConfig:
    """The loop: steps, batches, logging, evaluation, checkpoints."""

    output_dir: str = doc("runs/softpo", "Run directory: config, metrics, TensorBoard, checkpoints.")
    max_steps: int = doc(100, "Optimiser steps (one step = batch_size x grad_accum x processes rows).")
    batch_size: int = doc(8, "Rows per micro-batch per process.")
    grad_accum: int = doc(1, "Micro-batches per optimiser step.")
    seed: int = doc(0, "Seed for data order, sampling and initialisation.")
    logging_steps: int = doc(5, "Log training metrics every this many steps.")
    eval_steps: int = doc(50, "Held-out evaluation every this many steps (0: only at the end).")
    eval_batch_size: int = doc(16, "Rows per evaluation batch.")
    save_steps: int = doc(50, "Checkpoint every this many steps (0: only the final save).")
    save_total_limit: int = doc(2, "Checkpoints kept (oldest removed first).")
    resume: bool = doc(False, "Continue from the latest complete checkpoint in output_dir.")
    max_nonfinite_steps: int = doc(5, "Consecutive non-finite steps before the run stops.")
    progress: bool = doc(True, "Show a progress bar.")
    saturation_check: int = doc(64, "Before training, score this many training examples and warn "
                                "when most of them are already explained by the policy (their "
                                "preference term saturated, so they give almost no gradient; "
                                "docs/experts.md). 0: no check.")
    report_to: list[str] = doc(["tensorboard", "jsonl"], "Metric sinks: tensorboard, jsonl, and "
                               "the trackers wandb, mlflow, trackio (each an optional extra: "
                               "pip install 'softpo[wandb]'; docs/experts.md).")
    project: str = doc("softpo", "Tracker project (MLflow: experiment) the run is logged under; "
                       "the run is named after output_dir.")


@dataclass
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---------------------------------------------------------------- building from YAML and overrides

def load_config(path: str | Path | Config | None = None,
                overrides: list[str] | None = None) -> Config:
    """Defaults, then `path`'s values, then `a.b=value` overrides; validated.

    `path` is a YAML file, or a `Config` built in Python: that is copied and checked key by key
    exactly as a file's values are (types, then ranges), so both fail with the same one-line
    `UserError` naming the key. The given `Config` is never modified."""
    cfg, origins = Config(), {}  # dotted key -> where its value came from, for error messages
    if isinstance(path, Config):
        merge(cfg, _plain(path), source=None)
    elif path is not None:
        values = read_yaml(Path(path))
        merge(cfg, values, source=str(path))
        origins.update(dict.fromkeys(_dotted_keys(values), str(path)))
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override '{item}' must look like section.key=value")
        set_dotted(cfg, key.strip(), parse_value(raw), source="command line")
        origins = {k: v for k, v in origins.items() if not k.startswith(key.strip() + ".")}
        origins[key.strip()] = "command line"
    validate(cfg, origins)
    return cfg


def _plain(value: Any) -> Any:
    """A Python config's values as YAML would give them: sections as dicts of every attribute set
    (a misspelt one too, so that it is reported), tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = vars(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _dotted_keys(values: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        out += _dotted_keys(value, dotted + ".") if isinstance(value, dict) else [dotted]
    return out


def read_yaml(path: Path) -> dict:
    """A config file's mapping of sections; one-line UserErrors for everything unreadable."""
    if not path.is_file():
        raise UserError("config file not found", source=str(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # safe: no Python objects, ever
    except OSError as e:
        raise UserError(f"cannot read config file ({e.strerror or e})", source=str(path)) from None
    except UnicodeDecodeError as e:
        raw = path.read_bytes()
        raise UserError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x}); save the file as UTF-8",
                        source=str(path), row=raw[:e.start].count(b"\n") + 1) from None
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        problem = getattr(e, "problem", None)
        raise UserError(f"not valid YAML ({type(e).__name__}{': ' + problem if problem else ''})",
                        source=str(path), row=None if line is None else line + 1) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError("top level must be a mapping of sections", source=str(path))
    return data


def parse_value(raw: str) -> Any:
    """Override values are YAML scalars: `1e-5`, `true`, `[a, b]`, `null`."""
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def merge(obj: Any, values: dict, source: str | None, prefix: str = "") -> None:
    """Set every value of a nested mapping on the config `obj`, checking keys and types."""
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dataclasses.is_dataclass(getattr(obj, str(key), None)):
            merge(getattr(obj, key), value, source, prefix=dotted + ".")
        else:
            set_dotted(obj, str(key), value, source=source, prefix=prefix)


def set_dotted(obj: Any, key: str, value: Any, source: str | None, prefix: str = "") -> None:
    """Set `a.b.c = value` on `obj`: unknown sections and keys and wrong types are UserErrors."""
    *parents, leaf = key.split(".")
    for part in parents:
        fields = _field_types(type(obj))
        if part not in fields:
            raise UserError(f"unknown config section '{prefix}{part}'{_suggest(part, fields)}",
                            source=source)
        if not dataclasses.is_dataclass(fields[part]):
            raise UserError(f"config key '{prefix}{part}' is a value, not a section", source=source)
        obj, prefix = getattr(obj, part), f"{prefix}{part}."
    types_ = _field_types(type(obj))
    if leaf not in types_:
        what = "section" if isinstance(value, dict) else "key"
        raise UserError(f"unknown config {what} '{prefix}{leaf}'{_suggest(leaf, types_)}",
                        source=source)
    if dataclasses.is_dataclass(types_[leaf]) and isinstance(value, dict):
        merge(getattr(obj, leaf), value, source, prefix=f"{prefix}{leaf}.")
        return
    setattr(obj, leaf, coerce(value, types_[leaf], f"{prefix}{leaf}", source))


def coerce(value: Any, tp: Any, key: str, source: str | None) -> Any:
    """Check a value against a field's annotation; ints are accepted for floats, which must be
    finite; list items are checked against the list's item type."""
    options = typing.get_args(tp) if _is_union(tp) else (tp,)
    for option in options:
        if option is type(None) and value is None:
            return None
        base = typing.get_origin(option) or option
        if base is float and (isinstance(value, (int, float)) and not isinstance(value, bool)
                              or isinstance(value, str) and _is_number(value)):
            if not math.isfinite(float(value)):  # YAML 1.1 reads `1e-5` (no dot) as a string
                raise UserError(f"config key '{key}': must be a finite number, got {value!r}",
                                source=source)
            return float(value)
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base is bool and isinstance(value, bool):
            return value
        if base is str and isinstance(value, str):
            return value
        if base is list and isinstance(value, list):
            item = (typing.get_args(option) or (Any,))[0]
            return [v if item is Any else coerce(v, item, f"{key}[{i}]", source)
                    for i, v in enumerate(value)]
    expected = " or ".join(_type_name(o) for o in options)
    raise UserError(f"config key '{key}': expected {expected}, got {value!r}", source=source)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip().lower() not in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity")


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return "a section (mapping of keys)"
    return "null" if tp is type(None) else getattr(typing.get_origin(tp) or tp, "__name__", str(tp))


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _suggest(name: str, options: dict) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


# ---------------------------------------------------------------- validation

def validate(cfg: Config, origins: dict[str, str] | None = None) -> None:
    """Out-of-range values raise `UserError` naming the key (and the file or command line that
    set it, from `origins`: dotted key or section -> source)."""
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            parts = key.split(".")
            heads = (".".join(parts[:i]) for i in range(len(parts), 0, -1))
            source = next((origins[h] for h in heads if h in (origins or {})), None)
            raise UserError(f"config key '{key}': {what}", source=source)

    need(cfg.loss.alpha > 0, "loss.alpha", f"must be > 0, got {cfg.loss.alpha}")
    need(cfg.loss.beta >= 0, "loss.beta", f"must be >= 0, got {cfg.loss.beta}")
    need(0 <= cfg.loss.label_smoothing < 0.5, "loss.label_smoothing", "must be in [0, 0.5)")
    need(cfg.train.batch_size >= 1, "train.batch_size", "must be >= 1")
    need(cfg.train.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1")
    need(cfg.train.grad_accum >= 1, "train.grad_accum", "must be >= 1")
    need(cfg.train.max_steps >= 1, "train.max_steps", "must be >= 1")
    need(cfg.train.logging_steps >= 1, "train.logging_steps", "must be >= 1")
    need(cfg.train.eval_steps >= 0 and cfg.train.save_steps >= 0, "train.save_steps",
         "eval_steps and save_steps must be >= 0")
    need(cfg.optim.lr > 0, "optim.lr", "must be > 0")
    need(cfg.optim.scheduler in ("cosine", "linear", "constant"), "optim.scheduler",
         "must be cosine, linear or constant")
    need(cfg.optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    need(cfg.model.dtype in ("float32", "bfloat16"), "model.dtype", "must be float32 or bfloat16")
    need(cfg.data.max_length >= 2, "data.max_length", "must be >= 2")
    need(0 < cfg.data.max_prompt_length < cfg.data.max_length, "data.max_prompt_length",
         "must be > 0 and < data.max_length")
    need(0 <= cfg.data.eval_fraction < 1, "data.eval_fraction", "must be in [0, 1)")
    need(cfg.data.on_bad_rows in ("error", "skip"), "data.on_bad_rows", "must be error or skip")
    need(cfg.data.chat_template in ("auto", "never"), "data.chat_template", "must be auto or never")
    need(cfg.regularizer.estimator in ("token", "seq", "token_sf"), "regularizer.estimator",
         "must be token, seq or token_sf")
    need(cfg.regularizer.samples_per_prompt >= 2, "regularizer.samples_per_prompt", "must be >= 2")
    need(cfg.regularizer.prompts_per_step >= 1, "regularizer.prompts_per_step", "must be >= 1")
    need(cfg.regularizer.max_new_tokens >= 1, "regularizer.max_new_tokens", "must be >= 1")
    need(cfg.regularizer.sample_every >= 1, "regularizer.sample_every", "must be >= 1")
    need(cfg.lora.r >= 1, "lora.r", "must be >= 1")
    need(cfg.model.packing in PACKINGS, "model.packing",
         f"must be one of {', '.join(PACKINGS)}, got {cfg.model.packing!r}")
    need(not cfg.model.full_logits or cfg.model.packing == "none", "model.full_logits",
         f"scores padded rows: needs model.packing=none, got {cfg.model.packing!r}")
    need(cfg.model.pack_tokens >= 0, "model.pack_tokens",
         f"must be >= 0, got {cfg.model.pack_tokens}")
    need(cfg.lora.alpha > 0, "lora.alpha", "must be > 0")
    need(0 <= cfg.lora.dropout < 1, "lora.dropout", "must be in [0, 1)")
    need(cfg.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    need(cfg.optim.adam_eps >= 0, "optim.adam_eps", "must be >= 0")
    need(len(cfg.optim.adam_betas) == 2 and all(0 <= b < 1 for b in cfg.optim.adam_betas),
         "optim.adam_betas", f"must be two numbers in [0, 1), got {cfg.optim.adam_betas}")
    need(cfg.optim.max_grad_norm >= 0, "optim.max_grad_norm", "must be >= 0 (0 disables clipping)")
    need(bool(cfg.train.output_dir.strip()), "train.output_dir", "must not be empty")
    need(cfg.train.seed >= 0, "train.seed", "must be >= 0")
    need(cfg.train.save_total_limit >= 0, "train.save_total_limit", "must be >= 0")
    need(cfg.train.saturation_check >= 0, "train.saturation_check", "must be >= 0")
    need(cfg.train.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be >= 1")
    from softpo.tracking import SINKS

    need(set(cfg.train.report_to) <= set(SINKS), "train.report_to",
         f"known sinks are {', '.join(SINKS)}, got {cfg.train.report_to}")
    need(bool(cfg.train.project.strip()), "train.project", "must not be empty")
    if cfg.model.name_or_path == "tiny":  # learned positions (gpt2) cannot go past n_positions
        d = cfg.data
        new = max(cfg.regularizer.max_new_tokens,
                  cfg.online.max_new_tokens if cfg.online.enabled else 0)
        longest = max(d.max_length, d.max_prompt_length + new)
        need(longest <= cfg.model.tiny.n_positions, "model.tiny.n_positions",
             f"{cfg.model.tiny.n_positions} is shorter than the longest sequence ({longest}: "
             "data.max_length, or data.max_prompt_length + regularizer.max_new_tokens or "
             "online.max_new_tokens)")
    if cfg.online.enabled:
        validate_online(cfg, need)
    if cfg.loss.module:
        problem = import_problem(cfg.loss.module)
        need(problem is None, "loss.module", problem or "")
    from softpo.losses import F_DIVERGENCES, LOSSES  # late: `import softpo.config` stays torch-free

    need(cfg.loss.f_divergence in F_DIVERGENCES, "loss.f_divergence",
         f"must be one of {', '.join(F_DIVERGENCES)}, got {cfg.loss.f_divergence!r}")
    need(cfg.loss.name in LOSSES, "loss.name",
         f"unknown loss '{cfg.loss.name}' (known: {', '.join(sorted(LOSSES))})")
    need(LOSSES[cfg.loss.name].is_spo or cfg.loss.beta > 0, "loss.beta",
         f"must be > 0 for {cfg.loss.name} (it is the inverse temperature)")


def validate_online(cfg: Config, need) -> None:
    """The `online` section's ranges and the settings it cannot be combined with."""
    o = cfg.online
    need((o.expert is None) != (o.reward_model is None), "online.expert",
         "give exactly one of online.expert (module:function) and online.reward_model (a "
         "reward model folder or hub name)")
    need(o.responses >= 2, "online.responses", f"must be >= 2, got {o.responses}")
    need(o.max_new_tokens >= 1, "online.max_new_tokens", "must be >= 1")
    need(o.every >= 1, "online.every", "must be >= 1")
    need(0 <= o.start < cfg.train.max_steps, "online.start",
         f"must be in [0, train.max_steps) = [0, {cfg.train.max_steps}), got {o.start}")
    need(o.prompts_per_refresh >= 1, "online.prompts_per_refresh", "must be >= 1")
    need(o.sample_batch >= 1, "online.sample_batch", "must be >= 1")
    need(o.format in FORMATS, "online.format", f"must be one of {', '.join(FORMATS)}")
    need(o.pairing in PAIRINGS, "online.pairing", f"must be one of {', '.join(PAIRINGS)}")
    need(o.bt_temperature > 0, "online.bt_temperature", "must be > 0")
    need(o.pairs_per_prompt >= 0, "online.pairs_per_prompt", "must be >= 0 (0: all pairs)")
    need(o.mix in MIXES, "online.mix", f"must be one of {', '.join(MIXES)}")
    need(o.buffer >= 0, "online.buffer", "must be >= 0 (0: every refresh)")
    need(not cfg.loss.precompute_ref_logps, "loss.precompute_ref_logps",
         "cannot be combined with online.enabled: online rows are new at every refresh, so "
         "their reference log-probs come from the reference forward each step (set it to false)")


def import_problem(module: str) -> str | None:
    """Import `module` (a user's loss module); None when it worked, else what went wrong. Installed
    modules come first: the working directory is searched last, so a file there never replaces
    a module softpo imports."""
    import importlib
    import os

    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        return f"cannot import '{module}': module '{e.name or module}' not found"
    except Exception as e:  # the module itself raised while importing
        return f"importing '{module}' failed: {type(e).__name__}: {e}"
    return None


# ---------------------------------------------------------------- writing and documenting

def to_dict(cfg: Any) -> dict:
    """The config as nested plain dicts."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


def reference_markdown() -> str:
    """The config reference, generated from the field documentation."""
    out = ["# Configuration reference", "",
           "Generated by `python -m softpo.config`. A YAML file sets any subset of these; "
           "`section.key=value` on the command line overrides it. The resolved config is written "
           "to `config.yaml` in every run directory.", ""]

    def section(cls: type, prefix: str) -> None:
        rows, nested = [], []
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.type if isinstance(f.type, type) else None) or \
                    "help" not in f.metadata:
                nested.append(f)
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append(f"| `{prefix}{f.name}` | `{default!r}` | {f.metadata['help']} |")
        if rows:
            out.extend([f"## `{prefix.rstrip('.')}`", "", (cls.__doc__ or "").strip(), "",
                        "| key | default | meaning |", "|---|---|---|", *rows, ""])
        for f in nested:
            section(typing.get_type_hints(cls)[f.name], f"{prefix}{f.name}.")

    section(Config, "")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(reference_markdown())
