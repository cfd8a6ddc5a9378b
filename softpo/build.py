"""Building a run's parts from its config: policy (optionally LoRA), reference, optimiser, schedule."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from softpo.config import Config
from softpo.logprobs import Reference
from softpo.losses import LossSpec


def needs_reference(cfg: Config, spec: LossSpec) -> bool:
    """The reference forward runs only when the loss or the regulariser needs it."""
    return spec.needs_ref or regularizer_active(cfg, spec)


def regularizer_active(cfg: Config, spec: LossSpec) -> bool:
    return spec.is_spo and cfg.loss.beta > 0


def build_policy(cfg: Config, tokenizer) -> nn.Module:
    from softpo.models import load_model

    model = load_model(cfg.model, tokenizer, seed=cfg.train.seed)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora.enabled:
        model = add_lora(model, cfg)
    return model


def add_lora(model: nn.Module, cfg: Config) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    if cfg.model.gradient_checkpointing:
        model.enable_input_require_grads()
    return get_peft_model(model, lora)


def build_reference(cfg: Config, policy: nn.Module, tokenizer, device, chunk: int) -> Reference:
    """LoRA: the policy with its adapter disabled. Otherwise a frozen copy (or `ref_name_or_path`)."""
    autocast = cfg.model.autocast_bf16
    if cfg.lora.enabled and cfg.model.ref_name_or_path is None:
        return Reference(policy, adapter_toggle=True, chunk_size=chunk, autocast=autocast)
    if cfg.model.ref_name_or_path is not None:
        from softpo.models import load_model

        ref_cfg = copy.deepcopy(cfg.model)
        ref_cfg.name_or_path = cfg.model.ref_name_or_path
        ref = load_model(ref_cfg, tokenizer, seed=cfg.train.seed)
    else:
        ref = copy.deepcopy(policy)
    ref.eval().requires_grad_(False).to(device)
    return Reference(ref, adapter_toggle=False, chunk_size=chunk, autocast=autocast)


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


def stream_indices(n: int, start: int, count: int, seed: int) -> list[int]:
    """Positions [start, start+count) of an endless stream of seeded epoch permutations of range(n).

    Batches are a pure function of the step, so a resumed run reads exactly what the uninterrupted
    run read, and N processes together read what one process reads with the same global batch.
    """
    out, cache = [], {}
    for i in range(start, start + count):
        epoch, pos = divmod(i, n)
        if epoch not in cache:
            g = torch.Generator().manual_seed(seed * 100_003 + epoch)
            cache[epoch] = torch.randperm(n, generator=g).tolist()
        out.append(cache[epoch][pos])
    return out
