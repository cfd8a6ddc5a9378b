"""The training loop: explicit, on Accelerate.

One optimiser step:
  1. every `sample_every` steps (SPO with beta > 0): fresh samples y ~ pi_theta(.|x) for the
     regulariser's prompts, and the reference's view of them (no grad);
  2. for each of `grad_accum` micro-batches: one forward of the policy over every response of the
     batch (and, in the first micro-batch, over the samples), the registered loss on summed log-probs,
     `sum(losses) / (batch_size * grad_accum)` (+ beta * KL surrogate once per step), backward;
  3. clip, non-finite guard, AdamW step at the scheduled learning rate.
Batches and sampling seeds are pure functions of the step, so resume and N-process runs reproduce the
one-process, uninterrupted run (see `build.stream_indices`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from softpo import checkpoint
from softpo.build import (build_optimizer, build_policy, build_reference, learning_rate,
                          needs_reference, regularizer_active, stream_indices)
from softpo.config import Config, load_config, save_config
from softpo.errors import NonFiniteError, UserError
from softpo.logprobs import DEFAULT_CHUNK, PolicyScorer, Rows
from softpo.losses import KL_ESTIMATORS, LOSSES, ListLogps, LossParams, SampleLogps
from softpo.sampling import SampleBatch, sample
from softpo.tracking import MetricsWriter

SAMPLES = "regularizer_samples_{}.safetensors"  # in checkpoints, one per process
COMPATIBLE = {"pairs": {"pairs"}, "best_of_n": {"pairs", "best_of_n", "ranked"},
              "ranked": {"pairs", "ranked"}}


@dataclass
class RegularizerState:
    samples: SampleBatch
    ref_hidden: Tensor | None  # (N, H) reference states at sampled positions (token estimators)
    ref_token_logps: Tensor  # (S, T) reference log-probs of the sampled tokens


@dataclass
class StepStats:
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, values: Tensor) -> None:
        values = values.detach().float()
        self.sums[name] = self.sums.get(name, 0.0) + float(values.sum())
        self.counts[name] = self.counts.get(name, 0.0) + values.numel()


class Trainer:
    def __init__(self, cfg: Config, accelerator=None, *, tokenizer=None, policy=None,
                 examples: list | None = None):
        """Everything from `cfg`, except what is passed in (the sequence lab's in-memory runs):
        `tokenizer`, a prebuilt `policy` (used as given: no LoRA or gradient checkpointing is
        added; the reference is its frozen copy) and tokenised `examples` (`TokenizedExample`s,
        no held-out set; the regulariser's prompts are their distinct prompt texts)."""
        from accelerate import Accelerator

        from softpo.models import load_tokenizer

        self.cfg = cfg
        # On a machine without GPUs, cpu=True is what lets torchrun/accelerate start gloo DDP.
        self.acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        self.spec = LOSSES[cfg.loss.name]
        self.params = LossParams(alpha=cfg.loss.alpha, beta=cfg.loss.beta, gamma=cfg.loss.gamma,
                                 label_smoothing=cfg.loss.label_smoothing,
                                 simpo_gamma=cfg.loss.simpo_gamma, cpo_alpha=cfg.loss.cpo_alpha,
                                 rdpo_alpha=cfg.loss.rdpo_alpha)
        self.run_dir = Path(cfg.train.output_dir)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
        if examples is None:
            self._load_data()
        else:
            self._use_examples(examples)
        torch.manual_seed(cfg.train.seed)
        self.policy = policy if policy is not None else build_policy(cfg, self.tokenizer)
        self.reference = None
        if needs_reference(cfg, self.spec):
            self.reference = build_reference(cfg, self.policy, self.tokenizer, self.acc.device,
                                             DEFAULT_CHUNK)
        self.pack_style = self._packing_style()
        self.ref_cache = None
        if cfg.loss.precompute_ref_logps and self.spec.needs_ref:
            self._use_ref_cache()
        scorer = PolicyScorer(self.policy, DEFAULT_CHUNK, autocast=cfg.model.autocast_bf16)
        optimizer = build_optimizer(cfg, scorer)
        self.scorer, self.optimizer = self.acc.prepare(scorer, optimizer)
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.reg: RegularizerState | None = None
        self.writer = MetricsWriter(self.run_dir, cfg.train.report_to, self.acc.is_main_process)

    # ------------------------------------------------------------------ data

    def _load_data(self) -> None:
        from softpo import data

        cfg = self.cfg
        if not cfg.data.train:
            raise UserError("config key 'data.train': give a preference file or dataset")
        train, self.data_report = data.load_preferences(cfg.data.train, cfg.data)
        self.data_reports = [self.data_report]  # printed when training starts
        eval_report = self.data_report  # held-out rows split off train are counted with it
        if cfg.data.eval:
            evals, eval_report = data.load_preferences(cfg.data.eval, cfg.data)
            self.data_reports.append(eval_report)
        elif cfg.data.eval_fraction > 0 and len(train) >= 10:
            order = stream_indices(len(train), 0, len(train), cfg.train.seed + 7)
            cut = max(1, int(len(train) * cfg.data.eval_fraction))
            evals, train = [train[i] for i in order[:cut]], [train[i] for i in order[cut:]]
        else:
            evals = []
        kinds = {e.kind for e in train}
        allowed = COMPATIBLE[self.spec.data_kind]
        if not kinds <= allowed:
            raise UserError(f"loss '{self.spec.name}' needs {self.spec.data_kind} data, but "
                            f"{cfg.data.train} holds {', '.join(sorted(kinds))} rows")
        self.train_set = data.tokenize_examples(train, self.tokenizer, cfg.data, self.data_report)
        self.eval_set = data.tokenize_examples(evals, self.tokenizer, cfg.data, eval_report)
        if not self.train_set:
            raise UserError(f"{cfg.data.train}: no usable training rows")
        self.reg_prompts = (data.read_prompts(cfg.data.regularizer_prompts)
                            if cfg.data.regularizer_prompts else data.prompts_from_examples(train))

    def _use_examples(self, examples: list) -> None:
        kinds = {e.kind for e in examples}
        if not examples or not kinds <= COMPATIBLE[self.spec.data_kind]:
            raise UserError(f"loss '{self.spec.name}' needs {self.spec.data_kind} data, "
                            f"got {', '.join(sorted(kinds)) or 'no rows'}")
        self.train_set, self.eval_set = list(examples), []
        self.reg_prompts = list(dict.fromkeys(e.prompt_text for e in examples))

    def _collate(self, items: list):
        from softpo import data

        return data.collate(items, self.tokenizer.pad_token_id).to(self.acc.device)

    def micro_batch_items(self, step: int, micro: int) -> list:
        c, W, r = self.cfg.train, self.acc.num_processes, self.acc.process_index
        B = c.batch_size
        start = step * B * c.grad_accum * W + (micro * W + r) * B
        return [self.train_set[i] for i in stream_indices(len(self.train_set), start, B, c.seed)]

    # ------------------------------------------------------------------ regulariser

    def refresh_samples(self, step: int) -> None:
        from softpo import data

        rc, W, r = self.cfg.regularizer, self.acc.num_processes, self.acc.process_index
        P = rc.prompts_per_step
        start = (step // rc.sample_every) * P * W + r * P
        picks = stream_indices(len(self.reg_prompts), start, P, self.cfg.train.seed + 1)
        ids, mask = data.prompt_batch([self.reg_prompts[i] for i in picks], self.tokenizer,
                                      self.cfg.data)
        seed = self.cfg.train.seed * 1_000_003 + step * 101 + r
        samples = sample(self.acc.unwrap_model(self.scorer).model, self.tokenizer,
                         ids.to(self.acc.device), mask.to(self.acc.device), rc.samples_per_prompt,
                         rc.max_new_tokens, seed)
        self.reg = self._regularizer_state(samples)

    def _regularizer_state(self, samples: SampleBatch) -> RegularizerState:
        """The samples and the reference's view of them (no grad)."""
        if self.cfg.regularizer.estimator.startswith("token"):  # states and log-probs, one forward
            return RegularizerState(samples, *self.reference.sample_view(samples.rows))
        return RegularizerState(samples, None, self.reference.token_logps(samples.rows))

    def regularizer_loss(self, scores, stats: StepStats) -> Tensor:
        s = self.reg.samples
        P, k = s.num_prompts, s.samples_per_prompt
        shape = (P, k, -1)
        mask = s.rows.response_mask.float()
        sl = SampleLogps(scores.sample_token_logps.view(shape), self.reg.ref_token_logps.view(shape),
                         mask.view(shape),
                         None if scores.sample_token_kl is None else scores.sample_token_kl.view(shape))
        out = KL_ESTIMATORS[self.cfg.regularizer.estimator](sl)
        stats.add("kl", out.kl)
        stats.add("entropy", -(scores.sample_token_logps.detach() * mask).sum(-1))
        stats.add("sample_length", s.response_lengths.float())
        return self.cfg.loss.beta * out.surrogate.mean()

    # ------------------------------------------------------------------ speed features

    def _packing_style(self) -> str | None:
        """None for padded rows; the 4-D mask style for the packed layouts."""
        if self.cfg.model.packing == "none":
            return None
        from softpo.packing import packable_style

        try:
            return packable_style(self.policy)
        except ValueError as e:
            raise UserError(f"config key 'model.packing': {e}") from None

    def _use_ref_cache(self) -> None:
        """Reference log-probs from the cache (softpo/refcache.py); the separate reference model is
        freed when nothing else needs it."""
        from softpo import refcache

        if self.reference.adapter_toggle:  # the reference is the policy: on the device before prepare()
            self.policy.to(self.acc.device)
        self.ref_cache = refcache.load_or_build(self)
        if not regularizer_active(self.cfg, self.spec) and not self.reference.adapter_toggle:
            self.reference = None

    def rows(self, batch):
        """The layout the forward pass runs: padded rows, or packed rows (softpo/packing.py)."""
        if self.pack_style is None:
            return Rows(batch.input_ids, batch.attention_mask, batch.response_mask)
        from softpo.packing import pack

        m = self.cfg.model
        return pack(batch.input_ids, batch.response_mask, batch.response_valid,
                    self.tokenizer.pad_token_id, self.pack_style,
                    share_prompt=m.packing == "shared_prompt",
                    row_tokens=m.pack_tokens or 2 * batch.input_ids.shape[1])

    def ref_logps(self, batch, rows) -> Tensor:  # (R,)
        if self.ref_cache is not None:
            return self.ref_cache.lookup(batch.input_ids, batch.attention_mask, batch.response_mask)
        return self.reference.sequence_logps(rows)

    # ------------------------------------------------------------------ one step

    def forward_loss(self, batch, with_samples: bool, stats: StepStats, scale: float) -> Tensor:
        rows = self.rows(batch)
        B, n = batch.response_valid.shape
        ref_logps = None
        if self.spec.needs_ref:
            ref_logps = self.ref_logps(batch, rows).view(B, n)
        samples = self.reg.samples.rows if with_samples else None
        hidden = self.reg.ref_hidden if with_samples else None
        head = self.reference.head if (with_samples and hidden is not None) else None
        scores = self.scorer(rows, samples, hidden, head)
        logps = ListLogps(scores.token_logps.sum(-1).view(B, n), batch.response_lengths.float(),
                          batch.response_valid, ref_logps)
        out = self.spec.fn(logps, self.params)
        for name, value in out.stats.items():
            stats.add(name, value)
        stats.add("pref_loss", out.losses)
        loss = out.losses.sum() * scale
        if with_samples:
            loss = loss + self.regularizer_loss(scores, stats)
        return loss

    def train_step(self) -> dict[str, float]:
        c = self.cfg
        t0 = time.perf_counter()
        reg_on = regularizer_active(c, self.spec)
        if reg_on and (self.reg is None or self.step % c.regularizer.sample_every == 0):
            self.refresh_samples(self.step)
        lr = learning_rate(c, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        stats, tokens = StepStats(), 0
        scale = 1.0 / (c.train.batch_size * c.train.grad_accum)
        self.scorer.train()
        for micro in range(c.train.grad_accum):
            batch = self._collate(self.micro_batch_items(self.step, micro))
            tokens += int(batch.attention_mask.sum())
            last = micro == c.train.grad_accum - 1
            ctx = self.acc.no_sync(self.scorer) if not last else _null()
            with ctx:
                loss = self.forward_loss(batch, reg_on and micro == 0, stats, scale)
                self.acc.backward(loss)
        if reg_on:
            tokens += int(self.reg.samples.rows.attention_mask.sum())
        grad_norm = self._clip()
        finite = math.isfinite(grad_norm) and all(math.isfinite(v) for v in stats.sums.values())
        self._guard(finite)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        metrics = {k: stats.sums[k] / max(stats.counts[k], 1) for k in stats.sums}
        metrics["loss"] = metrics["pref_loss"] + (c.loss.beta * metrics["kl"] if reg_on else 0.0)
        metrics.update(grad_norm=grad_norm, learning_rate=lr,
                       tokens_per_second=tokens / max(time.perf_counter() - t0, 1e-9),
                       nonfinite_steps=float(self.nonfinite_total))
        return metrics

    def _clip(self) -> float:
        params = [p for p in self.scorer.parameters() if p.requires_grad]
        max_norm = self.cfg.optim.max_grad_norm if self.cfg.optim.max_grad_norm > 0 else float("inf")
        norm = self.acc.clip_grad_norm_(params, max_norm)
        return float(norm)

    def _guard(self, finite: bool) -> None:
        if finite:
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        if self.nonfinite_in_a_row >= self.cfg.train.max_nonfinite_steps:
            last = checkpoint.latest_complete(self.run_dir / "checkpoints")
            where = f"; last good checkpoint: {last}" if last else ""
            raise NonFiniteError(f"{self.nonfinite_in_a_row} consecutive steps with non-finite loss "
                                 f"or gradients at step {self.step} (lower optim.lr?){where}")

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.eval_set:
            return {}
        self.scorer.eval()
        stats = StepStats()
        W, r, bs = self.acc.num_processes, self.acc.process_index, self.cfg.train.eval_batch_size
        mine = self.eval_set[r::W]
        for start in range(0, len(mine), bs):
            self.forward_loss(self._collate(mine[start:start + bs]), False, stats, 1.0)
        names = sorted(set(stats.sums) | {"pref_loss"})
        totals = torch.tensor([[stats.sums.get(k, 0.0), stats.counts.get(k, 0.0)] for k in names],
                              device=self.acc.device, dtype=torch.float64)
        totals = self.acc.reduce(totals, reduction="sum")
        self.scorer.train()
        return {f"eval_{k}": float(s / max(n, 1)) for k, (s, n) in zip(names, totals.tolist())}

    # ------------------------------------------------------------------ checkpoints

    def params_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.scorer.parameters())

    def save_checkpoint(self) -> None:
        """Never during a run of non-finite steps, nor of non-finite parameters: such a checkpoint
        would prune the last good ones."""
        if self.nonfinite_in_a_row or not self.params_finite():
            self.acc.print(f"softpo: step {self.step}: non-finite loss, gradients or parameters; "
                           "checkpoint not written (the last good one is kept)")
            return
        state = {"step": self.step, "nonfinite_total": self.nonfinite_total,
                 "nonfinite_in_a_row": self.nonfinite_in_a_row, "loss": self.cfg.loss.name}
        checkpoint.save(self.run_dir / "checkpoints", self.step, self._save_state, state,
                        self.cfg.train.save_total_limit, self.acc.is_main_process,
                        self.acc.wait_for_everyone)

    def _save_state(self, directory: Path) -> None:
        """Accelerate's state, and this process's regulariser samples: they were drawn from the
        policy of the last refresh step, which a resumed run can no longer sample from."""
        self.acc.save_state(str(directory), safe_serialization=True)
        if self.reg is not None:
            from safetensors.torch import save_file

            s = self.reg.samples
            tensors = {"input_ids": s.rows.input_ids, "attention_mask": s.rows.attention_mask,
                       "response_mask": s.rows.response_mask,
                       "response_lengths": s.response_lengths, "finished": s.finished}
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                      str(directory / SAMPLES.format(self.acc.process_index)),
                      metadata={"num_prompts": str(s.num_prompts), "k": str(s.samples_per_prompt)})

    def _load_samples(self, directory: Path) -> None:
        path = directory / SAMPLES.format(self.acc.process_index)
        self.reg = None  # without saved samples they are redrawn at the last refresh step
        if not path.is_file():
            return
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta, t = f.metadata(), {k: f.get_tensor(k).to(self.acc.device) for k in f.keys()}
        samples = SampleBatch(Rows(t["input_ids"], t["attention_mask"], t["response_mask"]),
                              int(meta["num_prompts"]), int(meta["k"]), t["response_lengths"],
                              t["finished"])
        self.reg = self._regularizer_state(samples)

    def resume(self) -> bool:
        last = checkpoint.latest_complete(self.run_dir / "checkpoints")
        if last is None:
            return False
        self.acc.load_state(str(last))
        state = checkpoint.read_state(last)
        self.step = int(state["step"])
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
        self._load_samples(last)
        return True

    # ------------------------------------------------------------------ the run

    def train(self) -> dict[str, float]:
        from tqdm.auto import tqdm

        c = self.cfg.train
        if self.acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
        for report in getattr(self, "data_reports", []):
            self.acc.print(report.summary())
        if c.resume and self.resume():
            self.acc.print(f"resumed from step {self.step}")
        if self.reg is None and regularizer_active(self.cfg, self.spec) and self.step > 0:
            last_refresh = self.step - self.step % self.cfg.regularizer.sample_every
            self.refresh_samples(last_refresh)
        bar = tqdm(total=c.max_steps, initial=self.step, desc=f"softpo {self.spec.name}",
                   disable=not (c.progress and self.acc.is_main_process), dynamic_ncols=True)
        last: dict[str, float] = {}
        while self.step < c.max_steps:
            metrics = self.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                            acc=f"{metrics.get('rewards/accuracies', float('nan')):.2f}")
            if self.step % c.logging_steps == 0 or self.step == c.max_steps:
                last = self._reduce(metrics)
                self.writer.log(self.step, last)
            if c.eval_steps and self.step % c.eval_steps == 0 and self.step < c.max_steps:
                self.writer.log(self.step, self.evaluate())
            if c.save_steps and self.step % c.save_steps == 0 and self.step < c.max_steps:
                self.save_checkpoint()
        bar.close()
        final_eval = self.evaluate()
        self.writer.log(self.step, final_eval)
        self.save_final({**last, **final_eval})
        self.writer.close()
        return {**last, **final_eval}

    def _reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.acc.num_processes == 1:
            return metrics
        names = sorted(metrics)
        t = torch.tensor([metrics[k] for k in names], device=self.acc.device, dtype=torch.float64)
        t = self.acc.reduce(t, reduction="mean")
        out = dict(zip(names, t.tolist()))
        out["tokens_per_second"] *= self.acc.num_processes
        return out

    def save_final(self, metrics: dict[str, float]) -> None:
        from softpo.models import save_pretrained_atomic
        from softpo.report import model_card

        if not self.params_finite():
            last = checkpoint.latest_complete(self.run_dir / "checkpoints")
            where = f"; last good checkpoint: {last}" if last else ""
            raise NonFiniteError(f"parameters are non-finite at step {self.step}; the final model "
                                 f"was not saved{where}")
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            model = self.acc.unwrap_model(self.scorer).model
            out = self.run_dir / "final"
            base = None
            if self.cfg.lora.enabled and self.cfg.model.name_or_path == "tiny":
                from softpo.models import build_tiny_model

                base = build_tiny_model(self.cfg.model.tiny, self.tokenizer, self.cfg.train.seed)
            save_pretrained_atomic(model, self.tokenizer, out,
                                   extra_files={"config.yaml": _yaml(self.cfg),
                                                "README.md": model_card(self.cfg, metrics)},
                                   base_model=base)
        self.acc.wait_for_everyone()


def _yaml(cfg: Config) -> str:
    import yaml

    from softpo.config import to_dict

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ---------------------------------------------------------------- `softpo train`

def train_arguments(p) -> None:
    p.add_argument("config", help="YAML config (see docs/config.md)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.name=dpo loss.beta=0.1")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")


def train_command(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.resume:
        cfg.train.resume = True
    try:
        trainer = Trainer(cfg)
        metrics = trainer.train()
    except NonFiniteError as e:
        raise UserError(str(e)) from None
    except checkpoint.CheckpointError as e:
        raise UserError(str(e)) from None
    if not trainer.acc.is_main_process:
        return 0
    keys = [k for k in ("loss", "rewards/accuracies", "eval_rewards/accuracies", "eval_pref_loss", "kl")
            if k in metrics]
    print("final: " + "  ".join(f"{k}={metrics[k]:.4f}" for k in keys))
    print(f"model saved to {Path(cfg.train.output_dir) / 'final'}")
    return 0
