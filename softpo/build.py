"""Assembling a run from its config: the data, the loss parameters, the policy (optionally LoRA),
the reference, the packed layout, the reference log-prob cache, the optimiser and the schedule.

Everything here runs once, before the first step; `softpo.trainer` then runs the steps.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from softpo.collate import TokenizedExample, collate, collect, pad_token_id, stream_indices
from softpo.config import Config
from softpo.data import DataReport, distinct_prompts, read_prompts
from softpo.errors import UserError
from softpo.logprobs import Reference
from softpo.losses import LossParams, LossSpec
from softpo.tokcache import load_tokenized

# the data kinds a loss can read: a ranked list or best-of-n row holds pairs, a ranking a winner
COMPATIBLE = {"pairs": {"pairs"}, "best_of_n": {"pairs", "best_of_n", "ranked"},
              "ranked": {"pairs", "ranked"}}


def loss_params(cfg: Config) -> LossParams:
    """The loss hyper-parameters of `cfg.loss`."""
    c = cfg.loss
    return LossParams(alpha=c.alpha, beta=c.beta, gamma=c.gamma, label_smoothing=c.label_smoothing,
                      simpo_gamma=c.simpo_gamma, cpo_alpha=c.cpo_alpha, rdpo_alpha=c.rdpo_alpha,
                      f_divergence=c.f_divergence)


def needs_reference(cfg: Config, spec: LossSpec) -> bool:
    """The reference forward runs only when the loss or the regulariser needs it."""
    return spec.needs_ref or regularizer_active(cfg, spec)


def regularizer_active(cfg: Config, spec: LossSpec) -> bool:
    """SPO's global KL regulariser is on: an SPO loss with `loss.beta > 0`."""
    return spec.is_spo and cfg.loss.beta > 0


# ---------------------------------------------------------------- data

@dataclass
class RunData:
    """What a run reads: tokenised train and held-out examples, the regulariser's prompts, and the
    reports printed when training starts."""

    train_set: list[TokenizedExample]
    eval_set: list[TokenizedExample]
    reg_prompts: list  # strings or conversations
    reports: list[DataReport]
    online_prompts: list = field(default_factory=list)  # online SPO's prompts, when it is on


def _check_kinds(spec: LossSpec, kinds: set[str], where: str) -> None:
    if not kinds <= COMPATIBLE[spec.data_kind]:
        raise UserError(f"loss '{spec.name}' needs {spec.data_kind} data, but {where} holds "
                        f"{', '.join(sorted(kinds))} rows")


def load_data(cfg: Config, tokenizer, spec: LossSpec, train: Any = None,
              eval: Any = None) -> RunData:
    """Read, validate and tokenise the training (and held-out) preferences.

    `train` / `eval` override `cfg.data.train` / `cfg.data.eval`: a path or hub name, or in memory
    a `datasets.Dataset` or a list of dicts. Without held-out data, `data.eval_fraction` of the
    training rows (at least 10 of them) is split off by a seeded permutation. Each source is
    tokenised once and kept on disk with `data.cache_tokens` (softpo/tokcache.py)."""
    d = cfg.data
    source, name = (d.train, None) if train is None else (train, _name(train, "train_dataset"))
    if source is None or isinstance(source, str) and not source:
        if not cfg.online.enabled:
            raise UserError("config key 'data.train': give a preference file or dataset")
        return _online_only(cfg, tokenizer, spec, eval)
    src = load_tokenized(source, tokenizer, d, name=name)
    report = src.report
    reports, eval_report = [report], report  # held-out rows split off train are counted with it
    n, eval_source = len(src.results), d.eval if eval is None else eval
    train_rows: list[int] = list(range(n))  # positions in src.results / src.prompts
    if eval_source is not None and (not isinstance(eval_source, str) or eval_source):
        held = load_tokenized(eval_source, tokenizer, d, name=None if eval is None else
                              _name(eval, "eval_dataset"))
        evals, eval_report = held.results, held.report
        reports.append(eval_report)
    elif d.eval_fraction > 0 and n >= 10:
        order = stream_indices(n, 0, n, cfg.train.seed + 7)
        cut = max(1, int(n * d.eval_fraction))
        evals, train_rows = [src.results[i] for i in order[:cut]], order[cut:]
    else:
        evals = []
    _check_kinds(spec, {report.kind}, report.source)  # a source holds one kind of row
    train_set = collect((src.results[i] for i in train_rows), d, report)
    eval_set = collect(evals, d, eval_report)
    if not train_set:
        raise UserError(f"{report.source}: no usable training rows")
    train_prompts = distinct_prompts(src.prompts[i] for i in train_rows)
    prompts = read_prompts(d.regularizer_prompts) if d.regularizer_prompts else train_prompts
    return RunData(train_set, eval_set, prompts, reports, online_prompts(cfg, spec, train_prompts))


def online_prompts(cfg: Config, spec: LossSpec, prompts: list) -> list:
    """Online SPO's prompts: `online.prompts`, else `prompts` (the training rows' distinct
    prompts), string prompts wrapped as a user message with `online.chat`; [] when online is off.
    Checks that the loss reads `online.format` rows."""
    from softpo.prefs import chat_prompts

    o = cfg.online
    if not o.enabled:
        return []
    if o.format not in COMPATIBLE[spec.data_kind]:
        raise UserError(f"config key 'online.format': loss '{spec.name}' needs {spec.data_kind} "
                        f"data, not {o.format} rows")
    return chat_prompts(read_prompts(o.prompts) if o.prompts else prompts, o.chat)


def _online_only(cfg: Config, tokenizer, spec: LossSpec, eval: Any) -> RunData:
    """No offline training data: every training row comes from online refreshes, the first at
    step 0; held-out rows only from `data.eval` (or `eval`)."""
    if not cfg.online.prompts:
        raise UserError("config key 'online.prompts': give a prompt file: data.train is empty, "
                        "so there are no training prompts to answer")
    if cfg.online.start != 0:
        raise UserError("config key 'online.start': must be 0 when data.train is empty "
                        "(training starts from the first refresh)")
    eval_source, eval_set, reports = cfg.data.eval if eval is None else eval, [], []
    if eval_source is not None and (not isinstance(eval_source, str) or eval_source):
        held = load_tokenized(eval_source, tokenizer, cfg.data, name=None if eval is None else
                              _name(eval, "eval_dataset"))
        reports.append(held.report)
        eval_set = collect(held.results, cfg.data, held.report)
    prompts = online_prompts(cfg, spec, [])
    reg = read_prompts(cfg.data.regularizer_prompts) if cfg.data.regularizer_prompts else prompts
    return RunData([], eval_set, reg, reports, prompts)


def _name(source: Any, what: str) -> str:
    """How messages name a source given in Python: its path, or what it was passed as."""
    return str(source) if isinstance(source, str) else what


def examples_data(examples: list[TokenizedExample], spec: LossSpec) -> RunData:
    """Tokenised examples given in memory (the sequence lab): no held-out set; the regulariser's
    prompts are their distinct prompt texts."""
    kinds = {e.kind for e in examples}
    if not examples or not kinds <= COMPATIBLE[spec.data_kind]:
        raise UserError(f"loss '{spec.name}' needs {spec.data_kind} data, "
                        f"got {', '.join(sorted(kinds)) or 'no rows'}")
    return RunData(list(examples), [], list(dict.fromkeys(e.prompt_text for e in examples)), [])


# ---------------------------------------------------------------- models

def build_policy(cfg: Config, tokenizer, model: nn.Module | None = None) -> nn.Module:
    """The policy: `model` when given (a user's own), else loaded from `cfg.model`; then the
    config's gradient checkpointing and LoRA adapter."""
    from softpo.models import check_vocabulary, load_model

    if model is None:
        model = load_model(cfg.model, tokenizer, seed=cfg.train.seed)
    else:
        check_vocabulary(model, tokenizer, "given as policy")
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora.enabled:
        model = add_lora(model, cfg)
    return model


def add_lora(model: nn.Module, cfg: Config) -> nn.Module:
    """The model with a fresh LoRA adapter (PEFT) as `cfg.lora` describes."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    if cfg.model.gradient_checkpointing:
        model.enable_input_require_grads()
    return get_peft_model(model, lora)


def build_reference(cfg: Config, policy: nn.Module, tokenizer, device, chunk: int) -> Reference:
    """LoRA: the policy with its adapter disabled. Otherwise a frozen copy (or `ref_name_or_path`)."""
    autocast, full = cfg.model.autocast_bf16, cfg.model.full_logits
    if cfg.lora.enabled and cfg.model.ref_name_or_path is None:
        return Reference(policy, adapter_toggle=True, chunk_size=chunk, autocast=autocast,
                         full_logits=full)
    if cfg.model.ref_name_or_path is not None:
        from softpo.models import load_model

        ref_cfg = copy.deepcopy(cfg.model)
        ref_cfg.name_or_path = cfg.model.ref_name_or_path
        ref = load_model(ref_cfg, tokenizer, seed=cfg.train.seed)
    else:
        ref = copy.deepcopy(policy)
    ref.eval().requires_grad_(False).to(device)
    return Reference(ref, adapter_toggle=False, chunk_size=chunk, autocast=autocast,
                     full_logits=full)


def packing_style(cfg: Config, policy: nn.Module) -> str | None:
    """None for padded rows; the 4-D mask style for the packed layouts (softpo/packing.py)."""
    if cfg.model.packing == "none":
        return None
    from softpo.packing import packable_style

    try:
        return packable_style(policy)
    except ValueError as e:
        raise UserError(f"config key 'model.packing': {e}") from None


def reference_cache(cfg: Config, reference: Reference, examples: list[TokenizedExample],
                    tokenizer, accelerator):
    """The reference log-probs of every row of `examples`, cached (softpo/refcache.py)."""
    from softpo import refcache

    bs, pad = cfg.train.eval_batch_size, pad_token_id(tokenizer)
    batches = [collate(examples[i:i + bs], pad).to(accelerator.device)
               for i in range(0, len(examples), bs)]
    return refcache.load_or_build(reference, batches, cfg, accelerator)


# ---------------------------------------------------------------- optimiser

def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.optim.lr,
                             betas=tuple(cfg.optim.adam_betas), eps=cfg.optim.adam_eps)


def learning_rate(cfg: Config, step: int) -> float:
    """Learning rate for optimiser step `step` (0-based): linear warmup, then the chosen decay."""
    peak, warm, total = cfg.optim.lr, cfg.optim.warmup_steps, cfg.train.max_steps
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    if cfg.optim.scheduler == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.optim.scheduler == "linear":
        return peak * (1 - progress)
    return peak
