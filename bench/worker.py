"""One benchmark run in a fresh process: build one trainer, run `warmup + steps` optimiser steps on the
case's rows in order, write step times, per-step model FLOPs and this process's peak RSS as JSON.

    python -m bench.worker run --case gpt2-86m --variant spo --precision bf16 --steps 3 --out r.json
    python -m bench.worker peak --out p.json      # torch.matmul peak, fp32 and bf16
    python -m bench.worker prepare --case tiny    # build and cache the case's model and data
    python -m bench.worker run --case tiny --variant spo --profile p.txt   # + where a step's time goes

Step time is the interval between the ends of consecutive optimiser steps, so everything a framework
does per step (collation, logging bookkeeping, the optimiser) is inside it; setup (model loading,
dataset preparation, any reference-log-prob precomputation) is reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from bench import assets
from bench.cases import CASES, DEFAULT_WORKLOAD, VARIANTS, Case, Variant, Workload
from bench.flops import Shape, matmul_peak, pair_flops, regularizer_flops


def rows_needed(steps: int, work: Workload = DEFAULT_WORKLOAD) -> int:
    return max(steps * work.pairs, 256)


# ---------------------------------------------------------------- softpo

def softpo_overrides(case: Case, v: Variant, model_dir: Path, data: Path, precision: str,
                     out: str, work: Workload = DEFAULT_WORKLOAD) -> list[str]:
    o = {"model.name_or_path": model_dir, "model.dtype": "float32",
         "model.autocast_bf16": precision == "bf16", "model.packing": v.packing,
         "model.full_logits": v.full_logits,
         "data.train": data, "data.eval_fraction": 0, "data.max_length": work.max_length,
         "data.max_prompt_length": work.max_prompt, "loss.name": v.method, "loss.beta": v.beta,
         "loss.alpha": 1.0, "loss.precompute_ref_logps": v.ref_cache, "lora.enabled": case.lora,
         "regularizer.prompts_per_step": work.pairs // 2, "regularizer.samples_per_prompt": 2,
         "regularizer.max_new_tokens": 32, "regularizer.sample_every": v.sample_every,
         "regularizer.estimator": "token", "optim.lr": 1e-6, "optim.scheduler": "constant",
         "optim.warmup_steps": 0, "optim.max_grad_norm": 1.0, "train.batch_size": work.pairs,
         "train.max_steps": 10 ** 6, "train.output_dir": out, "train.progress": False,
         "train.report_to": "[]", "train.seed": 0}
    return [f"{k}={v}" for k, v in o.items()]


def sync(device: str) -> None:
    """Wait for queued GPU work, so that a step's end is when its kernels finished."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def run_softpo(case: Case, v: Variant, model_dir: Path, data: Path, precision: str, steps: int,
               out: str, device: str = "cpu", work: Workload = DEFAULT_WORKLOAD,
               profile: Path | None = None) -> dict:
    import softpo.logprobs
    from softpo.config import load_config
    from softpo.trainer import Trainer

    t = Trainer(load_config(None, softpo_overrides(case, v, model_dir, data, precision, out, work)))
    n = work.pairs
    setup_end = time.perf_counter()
    if v.logit_budget:
        softpo.logprobs.LOGIT_BUDGET = v.logit_budget
    t.micro_batch_items = lambda step, micro: t.train_set[step * n:(step + 1) * n]
    sampling, samples = [0.0] * steps, [None] * steps
    refresh = t.refresh_samples

    def timed_refresh(step: int) -> None:
        start = time.perf_counter()
        refresh(step)
        sampling[step] += time.perf_counter() - start
        rows = t.reg.samples.rows
        lengths = t.reg.samples.response_lengths
        samples[step] = ((rows.attention_mask.sum(1) - lengths).tolist(), lengths.tolist())

    t.refresh_samples = timed_refresh
    ends = [(time.perf_counter(), time.process_time())]
    with profiler(device, profile) as prof:
        for _ in range(steps):
            t.train_step()
            sync(device)
            ends.append((time.perf_counter(), time.process_time()))
    if profile:
        profile.write_text(profile_table(prof, device))
    model = t.acc.unwrap_model(t.scorer).model
    shape, factor = Shape.of(model), 2.0 if case.lora else 3.0
    examples = [(len(e.prompt_ids), [len(r) for r in e.response_ids]) for e in t.train_set]
    reference = t.spec.needs_ref and not v.ref_cache
    flops, last = [], None
    for step in range(steps):
        f = sum(pair_flops(shape, p, rs, factor, reference, v.packing == "shared_prompt")
                for p, rs in examples[step * n:(step + 1) * n])
        if t.reg is not None:
            last = samples[step] or last
            f += regularizer_flops(shape, *last, factor, samples[step] is not None)
        flops.append(f)
    return dict(ends=ends, setup_end=setup_end, sampling=sampling, flops=flops, examples=examples,
                shape=shape.__dict__)


def profiler(device: str, path: Path | None):
    """torch.profiler over the steps when `path` is given (CPU, and CUDA kernels on a GPU), else
    nothing. Profiling slows the steps: a profiled run's times are not a measurement."""
    from contextlib import nullcontext

    if path is None:
        return nullcontext()
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    return profile(activities=activities)


def profile_table(prof, device: str, rows: int = 40) -> str:
    """The operators that took most time, by self time on the device (the CPU without a GPU)."""
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows) + "\n"


# ---------------------------------------------------------------- TRL

def run_trl(case: Case, v: Variant, model_dir: Path, data: Path, precision: str, steps: int,
            out: str, device: str = "cpu", work: Workload = DEFAULT_WORKLOAD) -> dict:
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    n = work.pairs
    common = dict(output_dir=out, per_device_train_batch_size=n, max_steps=steps,
                  learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0,
                  bf16=precision == "bf16", use_cpu=device == "cpu", gradient_checkpointing=False,
                  logging_steps=10 ** 6, save_strategy="no", report_to=[], disable_tqdm=True,
                  max_grad_norm=1.0, seed=0, max_length=work.max_length, dataloader_num_workers=0)
    peft_config = None
    if case.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    if v.method == "dpo":
        from trl import DPOConfig, DPOTrainer

        cls, args = DPOTrainer, DPOConfig(**common, beta=v.beta, loss_type="sigmoid",
                                          precompute_ref_log_probs=v.ref_cache)
    else:
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        cls, args = CPOTrainer, CPOConfig(**common, beta=v.beta, loss_type="sigmoid", cpo_alpha=0.0)

    class InOrder(cls):  # the same rows per step as softpo: no shuffling
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset or self.train_dataset)

    ends = []

    class StepTimes(TrainerCallback):
        def on_train_begin(self, *a, **k):
            ends.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, *a, **k):
            sync(device)
            ends.append((time.perf_counter(), time.process_time()))

    rows = assets.read_rows(data)[:steps * n]
    trainer = InOrder(model=model, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=tokenizer, peft_config=peft_config, callbacks=[StepTimes()])
    setup_end = time.perf_counter()
    trainer.train()
    ds = trainer.train_dataset
    if v.method == "dpo":
        examples = [(len(r["prompt_ids"]), [len(r["chosen_ids"]), len(r["rejected_ids"])]) for r in ds]
    else:
        examples = [(len(r["prompt_input_ids"]),
                     [len(r[f"{s}_input_ids"]) - len(r["prompt_input_ids"]) for s in ("chosen", "rejected")])
                    for r in ds]
    shape, factor = Shape.of(trainer.model), 2.0 if case.lora else 3.0
    reference = v.method == "dpo" and not v.ref_cache
    flops = [sum(pair_flops(shape, p, rs, factor, reference, False)
                 for p, rs in examples[s * n:(s + 1) * n]) for s in range(steps)]
    return dict(ends=ends, setup_end=setup_end, sampling=[0.0] * steps, flops=flops,
                examples=examples, shape=shape.__dict__)


RUNNERS = {"softpo": run_softpo, "trl": run_trl}


# ---------------------------------------------------------------- entry points

def run(args) -> dict:
    case, v = CASES[args.case], VARIANTS[args.variant]
    work, n = Workload(args.pairs, args.max_length), args.pairs
    steps = args.warmup + args.steps
    model_dir = assets.model_path(case)
    data = assets.data_path(case, rows_needed(steps, work), work)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="softpo-bench-") as out:
        extra = {"profile": args.profile} if args.profile else {}
        if args.profile and v.framework != "softpo":
            raise SystemExit("--profile profiles softpo's variants only")
        r = RUNNERS[v.framework](case, v, model_dir, data, args.precision, steps, out, args.device,
                                 work, **extra)
    ends, w = r.pop("ends"), args.warmup
    step_times = [b[0] - a[0] for a, b in zip(ends, ends[1:])]
    cpu_times = [b[1] - a[1] for a, b in zip(ends, ends[1:])]
    tokens = [sum(p * len(rs) + sum(rs) for p, rs in r["examples"][s * n:(s + 1) * n])
              for s in range(steps)]
    return dict(case=case.name, variant=v.name, framework=v.framework, precision=args.precision,
                pairs=work.pairs, max_length=work.max_length,
                threads=_threads(), warmup=w, step_seconds=step_times[w:], all_step_seconds=step_times,
                cpu_seconds=cpu_times[w:], load_average=os.getloadavg()[0],
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", ""),
                sampling_seconds=r["sampling"][w:], flops=r["flops"][w:], tokens=tokens[w:],
                setup_seconds=r["setup_end"] - start, shape=r["shape"],
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                device=args.device, peak_cuda_mb=_peak_cuda_mb(args.device))


def _peak_cuda_mb(device: str) -> float | None:
    if device != "cuda":
        return None
    import torch

    return torch.cuda.max_memory_allocated() / 2 ** 20


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.worker")
    p.add_argument("what", choices=["run", "peak", "prepare"])
    p.add_argument("--case", choices=sorted(CASES))
    p.add_argument("--variant", choices=sorted(VARIANTS))
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--pairs", type=int, default=DEFAULT_WORKLOAD.pairs, help="pairs per step")
    p.add_argument("--max-length", type=int, default=DEFAULT_WORKLOAD.max_length,
                   help="longest prompt + response (tokens)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu: hide any GPU; cuda: train and measure the matmul peak on the GPU")
    p.add_argument("--profile", type=Path,
                   help="write torch.profiler's table of the timed steps here (softpo variants)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "peak":
        result = {}
        for name in ("fp32", "bf16"):
            result[name], result[f"{name}_cpu"] = matmul_peak(name, device=args.device)
    elif args.what == "prepare":
        case = CASES[args.case]
        result = {"model": str(assets.model_path(case)),
                  "data": str(assets.data_path(case, max(args.rows, 256),
                                               Workload(args.pairs, args.max_length)))}
    else:
        result = run(args)
    text = json.dumps(result)
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
