"""The training loop: explicit, on Accelerate.

One optimiser step (`Trainer.train_step`):
  0. at online refresh steps (`online.enabled`): new preference rows sampled from the current
     policy and labelled by the expert (`softpo.online`), read by this and the following steps;
  1. every `sample_every` steps (SPO with beta > 0): fresh samples y ~ pi_theta(.|x) for the
     regulariser's prompts, and the reference's view of them (`softpo.regularizer`, no grad);
  2. for each of `grad_accum` micro-batches: one forward of the policy over every response of the
     batch (and, in the first micro-batch, over the samples), the registered loss on summed log-probs,
     `sum(losses) / (batch_size * grad_accum)` (+ beta * KL surrogate once per step), backward;
  3. clip, non-finite guard, AdamW step at the scheduled learning rate.
Batches and sampling seeds are pure functions of the step, so resume and N-process runs reproduce the
one-process, uninterrupted run (see `softpo.collate.stream_indices`). Everything the run is built
from (data, models, optimiser) comes from `softpo.build`.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from softpo import checkpoint, distributed, preemption
from softpo.build import (build_optimizer, build_policy, build_reference, examples_data,
                          learning_rate, load_data, loss_params, needs_reference, packing_style,
                          reference_cache, regularizer_active)
from softpo.collate import PreferenceBatch, collate, pad_token_id, stream_indices
from softpo.config import Config, load_config, save_config, to_dict
from softpo.errors import NonFiniteError, UserError
from softpo.logprobs import DEFAULT_CHUNK, PolicyScorer
from softpo.losses import LOSSES, ListLogps
from softpo.online import Online
from softpo.packing import PackedRows, Rows
from softpo.regularizer import Regularizer, RegularizerState
from softpo.tracking import MetricsWriter, tracker_problem


@dataclass
class StepStats:
    """Sums and counts of per-example statistics over a step's micro-batches (or an evaluation)."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, values: Tensor) -> None:
        """Accumulate every entry of `values` (detached) under `name`."""
        values = values.detach().float()
        self.sums[name] = self.sums.get(name, 0.0) + float(values.sum())
        self.counts[name] = self.counts.get(name, 0.0) + values.numel()


class Trainer:
    """One preference-optimisation run: the step, evaluation, checkpoints and the loop.

    Built from a `Config`, checked (and copied) as `softpo.config.load_config` checks a file.
    Anything passed in replaces what the config would build: `tokenizer`; `model`, a causal LM of
    one's own (with its `tokenizer`; the config's LoRA and gradient checkpointing are applied to
    it, and the reference is its frozen copy); `train_dataset` / `eval_dataset` (a path, a
    `datasets.Dataset` or a list of dicts in softpo's formats, instead of `data.train` /
    `data.eval`); or tokenised `examples` (`TokenizedExample`s, no held-out set; the sequence
    lab's in-memory runs). `train()` runs to `train.max_steps` and returns the final metrics;
    `model` is then the trained policy.
    """

    def __init__(self, cfg: Config, accelerator=None, *, tokenizer=None, model: nn.Module = None,
                 train_dataset=None, eval_dataset=None, examples: list | None = None):
        from softpo.models import load_tokenizer, with_pad_token

        cfg = self.cfg = load_config(cfg)
        if problem := tracker_problem(cfg.train.report_to):  # before anything is built
            raise UserError(problem)
        if model is not None and tokenizer is None and cfg.model.tokenizer is None:
            raise UserError("a model given in Python needs its tokenizer (tokenizer=..., or the "
                            "config key model.tokenizer)")
        for key, source in (("train", train_dataset), ("eval", eval_dataset)):
            if isinstance(source, (str, Path)):  # a path: recorded in the run's config.yaml
                setattr(cfg.data, key, str(source))
        train_dataset, eval_dataset = (None if isinstance(x, (str, Path)) else x
                                       for x in (train_dataset, eval_dataset))
        # On a machine without GPUs: gloo DDP, or FSDP2 when the launch asks for FSDP.
        self.acc = accelerator or distributed.accelerator(cfg.train.grad_accum,
                                                          cfg.optim.max_grad_norm)
        self.spec, self.params = LOSSES[cfg.loss.name], loss_params(cfg)
        self.run_dir = Path(cfg.train.output_dir)
        self.tokenizer = load_tokenizer(cfg.model) if tokenizer is None else \
            with_pad_token(tokenizer, "given")
        self.data = examples_data(examples, self.spec) if examples is not None else \
            load_data(cfg, self.tokenizer, self.spec, train_dataset, eval_dataset)
        self.train_set, self.eval_set = self.data.train_set, self.data.eval_set
        torch.manual_seed(cfg.train.seed)
        self.policy = build_policy(cfg, self.tokenizer, model)
        self.reference = None
        if needs_reference(cfg, self.spec):
            self.reference = build_reference(cfg, self.policy, self.tokenizer, self.acc.device,
                                             DEFAULT_CHUNK)
        self.pack_style = packing_style(cfg, self.policy)
        self.ref_cache = None
        if cfg.loss.precompute_ref_logps and self.spec.needs_ref:
            self._use_ref_cache()
        self.regularizer = Regularizer(cfg, self.data.reg_prompts, self.tokenizer, self.reference) \
            if regularizer_active(cfg, self.spec) else None
        self.online = Online(cfg, self.data.online_prompts, self.tokenizer, self.acc.device,
                             has_offline=bool(self.train_set)) if cfg.online.enabled else None
        scorer = PolicyScorer(self.policy, DEFAULT_CHUNK, autocast=cfg.model.autocast_bf16,
                              full_logits=cfg.model.full_logits,
                              **({"length_buckets": 1} if distributed.is_sharded(self.acc) else {}))
        optimizer = build_optimizer(cfg, scorer)
        self.scorer, self.optimizer = self.acc.prepare(scorer, optimizer)
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.writer = MetricsWriter(self.run_dir, cfg.train.report_to, self.acc.is_main_process,
                                    config=to_dict(cfg), project=cfg.train.project)

    def _use_ref_cache(self) -> None:
        """Reference log-probs from the cache; the separate reference model is freed when the
        regulariser does not need it either."""
        if self.reference.adapter_toggle:  # the reference is the policy: on the device before prepare()
            self.policy.to(self.acc.device)
        self.ref_cache = reference_cache(self.cfg, self.reference, self.train_set + self.eval_set,
                                         self.tokenizer, self.acc)
        if not regularizer_active(self.cfg, self.spec) and not self.reference.adapter_toggle:
            self.reference = None

    @property
    def model(self) -> nn.Module:
        """The policy being trained (after `train()`: the trained model; with LoRA, the PEFT model)."""
        return self.acc.unwrap_model(self.scorer).model

    @property
    def reg(self) -> RegularizerState | None:
        """The regulariser's current samples and the reference's view of them (None when off)."""
        return None if self.regularizer is None else self.regularizer.state

    # ------------------------------------------------------------------ batches

    def collate(self, items: list) -> PreferenceBatch:
        """Tokenised examples -> a batch on this process's device."""
        return collate(items, pad_token_id(self.tokenizer)).to(self.acc.device)

    def micro_batch_items(self, step: int, micro: int) -> list:
        """This process's examples for micro-batch `micro` of optimiser step `step`."""
        c, W, r = self.cfg.train, self.acc.num_processes, self.acc.process_index
        B = c.batch_size
        examples, origin, seed = self.train_set, 0, c.seed
        if self.online is not None:  # the online pool from the latest refresh on
            examples, origin, seed = self.online.source(step, self.train_set, c.seed)
        start = (step - origin) * B * c.grad_accum * W + (micro * W + r) * B
        return [examples[i] for i in stream_indices(len(examples), start, B, seed)]

    def refresh_samples(self, step: int) -> None:
        """Fresh regulariser samples for refresh step `step`, drawn from the current policy."""
        self.whole(lambda policy: self.regularizer.refresh(
            policy, step, self.acc.process_index, self.acc.num_processes, self.acc.device))

    def whole(self, fn, needed: bool = True):
        """`fn(policy)`, the policy's parameters whole (FSDP2 gathers them: softpo.distributed)."""
        return distributed.call_whole(self.acc, self.scorer, fn, needed)

    def refresh_online(self, step: int) -> None:
        """New online rows for refresh step `step`, drawn from the current policy and labelled by
        the expert on every process together; their metrics logged at `step`."""
        from accelerate.utils import gather_object

        metrics = self.whole(lambda policy: self.online.refresh(
            policy, step, self.acc.process_index, self.acc.num_processes, self.acc.device,
            gather_object))
        self.writer.log(step, metrics)

    def rows(self, batch: PreferenceBatch) -> Rows | PackedRows:
        """The layout the forward pass runs: padded rows, or packed rows (softpo/packing.py)."""
        if self.pack_style is None:
            return Rows(batch.input_ids, batch.attention_mask, batch.response_mask)
        from softpo.packing import pack

        m = self.cfg.model
        return pack(batch.input_ids, batch.response_mask, batch.response_valid,
                    pad_token_id(self.tokenizer), self.pack_style,
                    share_prompt=m.packing == "shared_prompt",
                    row_tokens=m.pack_tokens or 2 * batch.input_ids.shape[1])

    def ref_logps(self, batch: PreferenceBatch, rows: Rows | PackedRows) -> Tensor:  # (R,)
        """Reference log-probs of the batch's responses: from the cache, or a reference forward."""
        if self.ref_cache is not None:
            return self.ref_cache.lookup(batch.input_ids, batch.attention_mask, batch.response_mask)
        return self.whole(lambda _: self.reference.sequence_logps(rows),
                          self.reference.adapter_toggle)  # LoRA: the policy, adapter off

    # ------------------------------------------------------------------ one step

    def forward_loss(self, batch: PreferenceBatch, with_samples: bool, stats: StepStats,
                     scale: float) -> Tensor:
        """`scale * sum(losses)` of a batch, plus the regulariser's loss `with_samples`;
        statistics go to `stats`."""
        rows = self.rows(batch)
        B, n = batch.response_valid.shape
        ref_logps = self.ref_logps(batch, rows).view(B, n) if self.spec.needs_ref else None
        samples = hidden = head = full = None
        if with_samples:
            samples, hidden, full = self.reg.samples.rows, self.reg.ref_hidden, self.reg.ref_logp
            head = self.reference.head if hidden is not None else None
        scores = self.scorer(rows, samples, hidden, head, ref_sample_logp=full)
        logps = ListLogps(scores.token_logps.sum(-1).view(B, n), batch.response_lengths.float(),
                          batch.response_valid, ref_logps)
        out = self.spec.fn(logps, self.params)
        for name, value in out.stats.items():
            stats.add(name, value)
        stats.add("pref_loss", out.losses)
        loss = out.losses.sum() * scale
        if with_samples:
            reg_loss, reg_stats = self.regularizer.loss(scores)
            for name, value in reg_stats.items():
                stats.add(name, value)
            loss = loss + reg_loss
        return loss

    def train_step(self) -> dict[str, float]:
        """One optimiser step (module docstring); its metrics, averaged over its examples."""
        c = self.cfg
        t0 = time.perf_counter()
        reg_on = self.regularizer is not None
        if self.online is not None and self.online.due(self.step):
            self.refresh_online(self.step)
        if reg_on and (self.reg is None or self.step % c.regularizer.sample_every == 0):
            self.refresh_samples(self.step)
        lr = learning_rate(c, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        stats, tokens = StepStats(), 0
        scale = 1.0 / (c.train.batch_size * c.train.grad_accum)
        self.scorer.train()
        for micro in range(c.train.grad_accum):
            batch = self.collate(self.micro_batch_items(self.step, micro))
            tokens += batch.num_tokens
            last = micro == c.train.grad_accum - 1
            with self.acc.no_sync(self.scorer) if not last else nullcontext():
                self.acc.backward(self.forward_loss(batch, reg_on and micro == 0, stats, scale))
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
        return float(self.acc.clip_grad_norm_(params, max_norm))

    def _guard(self, finite: bool) -> None:
        """Count a non-finite step; too many in a row stop the run, naming the last good checkpoint."""
        if finite:
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        if self.nonfinite_in_a_row >= self.cfg.train.max_nonfinite_steps:
            raise NonFiniteError(f"{self.nonfinite_in_a_row} consecutive steps with non-finite loss "
                                 f"or gradients at step {self.step} (lower optim.lr?)"
                                 f"{self._last_good()}")

    def _last_good(self) -> str:
        last = checkpoint.latest_complete(self.run_dir / "checkpoints")
        return f"; last good checkpoint: {last}" if last else ""

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The loss and its statistics on the held-out set (`eval_` + name), over all processes."""
        if not self.eval_set:
            return {}
        self.scorer.eval()
        stats = StepStats()
        W, r, bs = self.acc.num_processes, self.acc.process_index, self.cfg.train.eval_batch_size
        mine = self.eval_set[r::W]
        for start in range(0, distributed.lockstep_rows(len(self.eval_set), self.acc), bs):
            items = mine[start:start + bs]  # FSDP2: a stand-in batch where a process has none
            self.forward_loss(self.collate(items or self.eval_set[:1]), False,
                              stats if items else StepStats(), 1.0)
        names = sorted(set(stats.sums) | {"pref_loss"})
        totals = torch.tensor([[stats.sums.get(k, 0.0), stats.counts.get(k, 0.0)] for k in names],
                              device=self.acc.device, dtype=torch.float64)
        totals = self.acc.reduce(totals, reduction="sum")
        self.scorer.train()
        return {f"eval_{k}": float(s / max(n, 1)) for k, (s, n) in zip(names, totals.tolist())}

    @torch.no_grad()
    def saturation(self) -> dict[str, float]:
        """Before training: over the first `train.saturation_check` examples of the run's stream,
        the share whose preference term is saturated under the current policy (`pref_saturated`),
        the mean log-prob margin chosen - rejected (`margin`), and the loss's mean preference
        probability (`pref_prob`). Empty when the check is off."""
        limit = min(self.cfg.train.saturation_check, len(self.train_set))
        if limit == 0:
            return {}
        self.scorer.eval()
        stats, bs = StepStats(), self.cfg.train.eval_batch_size
        items = [self.train_set[i] for i in stream_indices(len(self.train_set), 0, limit,
                                                           self.cfg.train.seed)]
        for start in range(0, limit, bs):
            self.forward_loss(self.collate(items[start:start + bs]), False, stats, 1.0)
        self.scorer.train()
        mean = {k: stats.sums[k] / max(stats.counts[k], 1) for k in stats.sums}
        if "pref_saturated" not in mean:  # a user's loss without the standard statistics
            return {}
        return {"pref_saturated": mean["pref_saturated"], "pref_prob": mean["pref_prob"],
                "margin": mean["logps/chosen"] - mean["logps/rejected"], "examples": float(limit)}

    # ------------------------------------------------------------------ checkpoints

    def params_finite(self) -> bool:
        """Whether every parameter of the policy is finite."""
        return distributed.all_finite(self.acc, self.scorer.parameters())

    def save_checkpoint(self) -> None:
        """A crash-safe checkpoint of step `step` (softpo/checkpoint.py). Never during a run of
        non-finite steps, nor of non-finite parameters: it would prune the last good ones."""
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
        self.acc.save_state(str(directory), safe_serialization=True)
        if self.regularizer is not None:
            self.regularizer.save(directory, self.acc.process_index)
        if self.online is not None and self.acc.is_main_process:  # the same on every process
            self.online.save(directory)

    def resume(self) -> bool:
        """Load the latest complete checkpoint, if any (weights, optimiser, RNG, samples, online
        rows)."""
        last = checkpoint.latest_complete(self.run_dir / "checkpoints")
        if last is None:
            return False
        self.acc.load_state(str(last))
        state = checkpoint.read_state(last)
        self.step = int(state["step"])
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
        if self.regularizer is not None:
            self.whole(lambda _: self.regularizer.load(last, self.acc.process_index,
                                                       self.acc.device),
                       self.reference.adapter_toggle)
        if self.online is not None:
            self.online.load(last)
        return True

    def save_final(self, metrics: dict[str, float]) -> None:
        """`final/` in Hugging Face format: the model or adapter, tokenizer, config, model card."""
        from softpo.models import build_tiny_model, save_pretrained_atomic
        from softpo.report import model_card

        if not self.params_finite():
            raise NonFiniteError(f"parameters are non-finite at step {self.step}; the final model "
                                 f"was not saved{self._last_good()}")
        state = distributed.full_state_dict(self.acc, self.scorer)  # FSDP2: gathered shards
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            base = None  # an adapter whose base cannot be loaded by name
            if self.cfg.lora.enabled and self.cfg.model.name_or_path == "tiny":
                base = build_tiny_model(self.cfg.model.tiny, self.tokenizer, self.cfg.train.seed)
            extra = {"config.yaml": _yaml(self.cfg), "README.md": model_card(self.cfg, metrics)}
            save_pretrained_atomic(self.model, self.tokenizer, self.run_dir / "final",
                                   extra_files=extra, base_model=base, state_dict=state)
        self.acc.wait_for_everyone()

    # ------------------------------------------------------------------ the run

    def train(self) -> dict[str, float]:
        """Run (or resume, with `train.resume`) to `train.max_steps`: log, evaluate and checkpoint
        on schedule, then save `final/`. Returns the last logged and final held-out metrics.
        SIGTERM or SIGINT: the step finishes, a checkpoint is written, `Preempted` is raised
        (`softpo.preemption`)."""
        with preemption.StopRequest() as stop:
            return self._train(stop)

    def _train(self, stop: preemption.StopRequest) -> dict[str, float]:
        from tqdm.auto import tqdm

        c = self.cfg.train
        if self.acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
        for report in self.data.reports:
            self.acc.print(report.summary())
        if c.resume and self.resume():
            self.acc.print(f"resumed from step {self.step}")
        if self.regularizer is not None and self.reg is None and self.step > 0:
            self.refresh_samples(self.step - self.step % self.cfg.regularizer.sample_every)
        if self.online is not None and self.online.last is None and \
                self.step > self.cfg.online.start:  # a checkpoint without online rows
            self.refresh_online(self.online.last_refresh_step(self.step - 1))
        if self.step == 0:
            self._check_saturation()
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
            signal_name = stop.agreed(self.acc) if self.step < c.max_steps else None
            if c.save_steps and self.step % c.save_steps == 0 and self.step < c.max_steps \
                    or signal_name:
                self.save_checkpoint()
            if signal_name:
                bar.close()
                self.writer.close()
                raise self._preempted(signal_name)
        bar.close()
        final_eval = self.evaluate()
        self.writer.log(self.step, final_eval)
        self.save_final({**last, **final_eval})
        self.writer.close()
        return {**last, **final_eval}

    def _preempted(self, signal_name: str) -> preemption.Preempted:
        """The stop after a signal, its line printed by the main process."""
        stopped = preemption.Preempted(signal_name, self.step, self.cfg.train.max_steps,
                                       checkpoint.latest_complete(self.run_dir / "checkpoints"))
        if self.acc.is_main_process:
            print(stopped, file=sys.stderr, flush=True)
        return stopped

    def _check_saturation(self) -> None:
        """Log the start's saturation (`start/...`) and warn when most examples give no signal."""
        from softpo.report import saturation_warning

        found = self.saturation()
        if not found:
            return
        self.writer.log(0, {f"start/{k}": v for k, v in found.items()})
        warning = saturation_warning(found, self.cfg)
        if warning:
            self.acc.print(warning)

    def _reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        """Metrics averaged over processes (throughput summed)."""
        if self.acc.num_processes == 1:
            return metrics
        names = sorted(metrics)
        t = torch.tensor([metrics[k] for k in names], device=self.acc.device, dtype=torch.float64)
        out = dict(zip(names, self.acc.reduce(t, reduction="mean").tolist()))
        out["tokens_per_second"] *= self.acc.num_processes
        return out


def _yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
