"""The engines that run a step on several processes, and what FSDP2 needs of softpo.

`accelerator()` builds the run's `Accelerator` from what `accelerate launch` (or `torchrun`) set in
the environment, after checking that softpo can run the engine and settings asked for (one line
otherwise, `engine_problem`).

DDP and DeepSpeed ZeRO-2 replicate the parameters, so the policy can be called anywhere. FSDP2
(`fully_shard`, Accelerate's `fsdp_version: 2`) shards them: every parameter is a `DTensor` holding
a 1/W slice, and a module's parameters are whole only inside its own forward and backward,
gathered by hooks on that forward. softpo's prepared module is `PolicyScorer`, the root; the
decoder layers are units of their own (the config's auto-wrap policy); the embeddings, final norm
and output layer belong to the root. So:

* Every process runs the same sequence of unit forwards (each one is an all-gather): the scorer
  runs one padded block per call (`PolicyScorer(length_buckets=1)`) instead of length groups
  that depend on the process's rows, and evaluation runs as many batches on every process
  (`lockstep_rows`).
* Forwards outside the training step's -- sampling with `generate()` (the regulariser's and
  online SPO's), the LoRA reference (the policy with its adapter off) -- go through
  `call_whole`: inside the root's forward (its parameters gathered by its own hook), with every
  unit gathered once and kept whole (`set_reshard_after_forward(False)`) until the call returns,
  then resharded. Nothing of FSDP communicates inside, so each process samples on its own, as
  under DDP, and draws what DDP draws; the price is the whole model in memory for the length of
  the call (as FSDP1's `summon_full_params`).
* The final model is gathered (`full_state_dict`, tied weights kept once) and saved in Hugging
  Face format by the main process; checkpoints are Accelerate's FSDP state
  (`fsdp_state_dict_type: SHARDED_STATE_DICT`: each process writes its shard of the weights and
  of the optimiser with torch.distributed.checkpoint), resumed with `load_state`.
* `fsdp_cpu_ram_efficient_loading` stays off: with it Transformers loads real weights on the
  first process only, while softpo builds the policy (and the reference copied from it) on
  every process; Accelerate's re-tying of the embeddings after its meta-device step also
  misses the tied output layer of a wrapped model (two parameters, different gradients).

Accelerate starts FSDP only on accelerators (GPUs, ...). FSDP2 itself runs on the CPU with gloo,
so on a machine without GPUs `accelerator()` turns on the FSDP plugin the launch asked for
(`accelerate launch --config_file configs/accelerate/fsdp.yaml`): the CPU test of the FSDP path
(tests/test_distributed.py).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

import torch
from torch import nn

from softpo.errors import UserError


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "false").lower() == "true"


def engine_problem(grad_accum: int, max_grad_norm: float, env: Mapping[str, str] = os.environ,
                   cuda: bool | None = None) -> str | None:
    """Why softpo cannot run the engine the launch environment `env` asks for, or None.

    FSDP must be FSDP2, without `cpu_ram_efficient_loading` (every process loads the model and,
    for full fine-tuning, keeps the reference built from it). DeepSpeed: not ZeRO-3 (softpo's
    chunked output layer reads `lm_head.weight` outside the head's forward, where ZeRO-3 holds a
    partition), gradient accumulation left to softpo (`train.grad_accum` and DeepSpeed's steps
    both 1: DeepSpeed would divide the loss and step on its own schedule), DeepSpeed's clipping
    equal to `optim.max_grad_norm`, and GPUs (Accelerate does not start DeepSpeed on the CPU; the
    run would quietly be DDP)."""
    if _flag(env, "ACCELERATE_USE_FSDP"):
        if env.get("FSDP_VERSION", "1") != "2":
            return "softpo runs FSDP as FSDP2: set fsdp_version: 2 in the Accelerate config"
        if _flag(env, "FSDP_CPU_RAM_EFFICIENT_LOADING"):
            return ("set fsdp_cpu_ram_efficient_loading: false in the Accelerate config: softpo "
                    "builds the policy and its reference on every process (with it, Transformers "
                    "loads real weights on the first process only)")
    if not _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        return None
    ds = _deepspeed_settings(env)
    if ds["stage"] == 3:
        return ("DeepSpeed ZeRO-3 is not supported (softpo reads the output layer's weight outside "
                "its forward, where ZeRO-3 holds a partition): use FSDP2 "
                "(configs/accelerate/fsdp.yaml) or ZeRO-2")
    if grad_accum != 1 or ds["grad_accum"] not in (None, 1):
        return (f"with DeepSpeed keep train.grad_accum=1 and DeepSpeed's gradient_accumulation_steps"
                f"=1 (got {grad_accum} and {ds['grad_accum']}); raise train.batch_size instead")
    if ds["clipping"] is not None and float(ds["clipping"]) != max_grad_norm:
        return (f"DeepSpeed's gradient_clipping ({ds['clipping']}) must equal optim.max_grad_norm "
                f"({max_grad_norm}): DeepSpeed clips, not softpo")
    if not (torch.cuda.is_available() if cuda is None else cuda):
        return ("DeepSpeed needs GPUs: Accelerate does not start it on the CPU (the run would "
                "quietly be DDP); use configs/accelerate/ddp.yaml or fsdp.yaml here")
    return None


def _deepspeed_settings(env: Mapping[str, str]) -> dict[str, Any]:
    """ZeRO stage, gradient accumulation steps and clipping, from `accelerate launch`'s variables
    or the DeepSpeed JSON file they name ("auto" and absent values are None)."""
    out: dict[str, Any] = {"stage": env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"),
                           "grad_accum": env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS"),
                           "clipping": env.get("ACCELERATE_GRADIENT_CLIPPING")}
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path and path.lower() != "none":
        try:
            ds = json.loads(open(path, encoding="utf-8").read())
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: cannot read the DeepSpeed config: {e}") from None
        out = {"stage": ds.get("zero_optimization", {}).get("stage"),
               "grad_accum": ds.get("gradient_accumulation_steps"),
               "clipping": ds.get("gradient_clipping")}
    for key in ("stage", "grad_accum"):
        out[key] = None if out[key] in (None, "auto", "none") else int(out[key])
    if out["clipping"] in ("auto", "none"):
        out["clipping"] = None
    return out


def accelerator(grad_accum: int = 1, max_grad_norm: float = 1.0):
    """The run's Accelerator: on the GPUs when there are any, else on the CPU (gloo across
    processes); FSDP2 on the CPU when the launch asked for FSDP (see the module docstring)."""
    from accelerate import Accelerator

    if problem := engine_problem(grad_accum, max_grad_norm):
        raise UserError(problem)
    cpu = not torch.cuda.is_available()
    acc = Accelerator(cpu=cpu)
    if cpu and acc.num_processes > 1 and _flag(os.environ, "ACCELERATE_USE_FSDP"):
        from accelerate import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        acc.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the launch's variables
        # Both shared states, as Accelerate sets them on GPUs: every later `AcceleratorState()`
        # copies PartialState's distributed type over its own.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        acc.state.distributed_type = DistributedType.FSDP
    return acc


def is_sharded(acc) -> bool:
    """Whether the run's parameters are sharded (FSDP2)."""
    return bool(getattr(acc, "is_fsdp2", False))


def call_whole(acc, scorer: nn.Module, fn: Callable[[nn.Module], Any], needed: bool = True) -> Any:
    """`fn(policy)` with every parameter of the policy whole, no grad; under DDP (or when not
    `needed`) simply `fn(policy)`. Every process must call it at the same point (FSDP2 gathers)."""
    from torch.distributed.fsdp import FSDPModule

    if not (needed and isinstance(scorer, FSDPModule)):
        return fn(acc.unwrap_model(scorer).model)
    after = bool(acc.state.fsdp_plugin.reshard_after_forward)

    def whole(model: nn.Module) -> Any:  # runs inside the root's forward: its parameters gathered
        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            return fn(model)
        finally:
            for unit in units:
                unit.set_reshard_after_forward(after, recurse=False)
                unit.reshard()

    with torch.no_grad():
        out = scorer(call=whole)
    scorer.reshard()
    return out


def lockstep_rows(num_rows: int, acc) -> int:
    """How many of `num_rows` held-out rows (dealt out over the processes, `rows[rank::W]`) this
    process steps through: its share; under FSDP2 the largest share (rank 0's) on every process,
    so that all run as many batches (a process out of rows runs a stand-in batch)."""
    return len(range(0 if is_sharded(acc) else acc.process_index, num_rows, acc.num_processes))


def all_finite(acc, params) -> bool:
    """Whether every parameter is finite, on every process (FSDP2: each checks its shards)."""
    local = all(bool(torch.isfinite(getattr(p, "_local_tensor", p)).all()) for p in params)
    if not is_sharded(acc):
        return local
    flag = torch.tensor([0.0 if local else 1.0], device=acc.device)
    return float(acc.reduce(flag, reduction="sum")) == 0.0


def full_state_dict(acc, scorer: nn.Module) -> dict[str, torch.Tensor] | None:
    """FSDP2: the policy's full state dict, gathered on the main process (every process must
    call); None otherwise (the model's own parameters are whole)."""
    if not is_sharded(acc):
        return None
    state = acc.get_state_dict(scorer)
    tied = _tied_names(scorer)  # gathered as copies: kept once, as save_pretrained keeps them
    return {k[len("model."):]: v for k, v in state.items()
            if k.startswith("model.") and k not in tied}


def _tied_names(module: nn.Module) -> set[str]:
    """Names of parameters that are another, earlier name's parameter (tied embeddings)."""
    first: dict[int, str] = {}
    later = set()
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            later.add(name)
        first.setdefault(id(p), name)
    return later
