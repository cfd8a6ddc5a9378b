"""SPO's global KL regulariser, beta * KL(pi_theta || pi_ref), estimated on fresh samples.

Every `regularizer.sample_every` optimiser steps the policy draws `samples_per_prompt` responses
for `prompts_per_step` prompts of the regulariser's prompt set (pure sampling at temperature 1,
`softpo.sampling`), and the reference looks at them once, without gradient (its states at the
sampled positions for the token estimators, with its full log-probs there when they fit one
output-layer chunk; its log-probs of the sampled tokens for all). In the step's first micro-batch
the policy scores the same samples with gradient (`softpo.logprobs.PolicyScorer`), and `loss`
turns both views into the estimator's surrogate (`softpo.losses`): its gradient estimates
grad KL(pi_theta || pi_ref). Sampling, the reference and the policy each run a prompt once for its
k samples (`softpo.sampling.sample`, `softpo.logprobs.sample_states`).

Which prompts and which seed are pure functions of the refresh step and the process, so a resumed
or N-process run draws what the uninterrupted one-process run draws. Samples drawn at the last
refresh step came from a policy a resumed run no longer has, so checkpoints carry them
(`save` / `load`, one safetensors file per process).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from softpo.collate import stream_indices
from softpo.config import Config
from softpo.logprobs import Reference, Scores
from softpo.losses import KL_ESTIMATORS, SampleLogps
from softpo.packing import Rows
from softpo.sampling import SampleBatch, sample_prompts

SAMPLES = "regularizer_samples_{}.safetensors"  # in checkpoints, one per process


@dataclass
class RegularizerState:
    """The current samples and the reference's view of them."""

    samples: SampleBatch
    ref_hidden: Tensor | None  # (N, H) reference states at sampled positions (token estimators)
    ref_token_logps: Tensor  # (S, T) reference log-probs of the sampled tokens
    ref_logp: Tensor | None = None  # (V, N) its full log-probs there, when they fit one chunk


class Regularizer:
    """Fresh samples, the reference's view of them, the surrogate loss, and their checkpoint file.

    `prompts` are the regulariser's prompts (strings or conversations); `reference` the frozen
    reference. `state` is None until the first `refresh`.
    """

    def __init__(self, cfg: Config, prompts: list, tokenizer, reference: Reference):
        self.cfg, self.prompts, self.tokenizer, self.reference = cfg, prompts, tokenizer, reference
        self.state: RegularizerState | None = None

    def refresh(self, policy: nn.Module, step: int, rank: int, world: int, device) -> None:
        """Draw this process's samples for refresh step `step` from `policy`."""
        rc = self.cfg.regularizer
        P = rc.prompts_per_step
        start = (step // rc.sample_every) * P * world + rank * P
        picks = stream_indices(len(self.prompts), start, P, self.cfg.train.seed + 1)
        seed = self.cfg.train.seed * 1_000_003 + step * 101 + rank
        samples = sample_prompts(policy, self.tokenizer, [self.prompts[i] for i in picks],
                                 self.cfg.data, rc.samples_per_prompt, rc.max_new_tokens, seed,
                                 device=device)
        self.state = self.view(samples)

    def view(self, samples: SampleBatch) -> RegularizerState:
        """The samples and the reference's view of them (no grad), from one reference forward
        that runs each prompt once for its samples. Token estimators keep the reference's states
        and, when they fit one output-layer chunk, its full log-probs at the sampled positions
        (`Reference.sample_view`)."""
        if self.cfg.regularizer.estimator.startswith("token"):
            return RegularizerState(samples, *self.reference.sample_view(samples.rows, True))
        return RegularizerState(samples, None, self.reference.sample_logps(samples.rows))

    def loss(self, scores: Scores) -> tuple[Tensor, dict[str, Tensor]]:
        """beta * the estimator's surrogate (a scalar whose gradient estimates beta * grad KL), and
        per-sample statistics: the KL estimate, the sequence entropy estimate, the length."""
        s = self.state.samples
        shape = (s.num_prompts, s.samples_per_prompt, -1)  # (P, k, T)
        mask = s.rows.response_mask.float()  # (S, T)
        kl = None if scores.sample_token_kl is None else scores.sample_token_kl.view(shape)
        sl = SampleLogps(scores.sample_token_logps.view(shape),
                         self.state.ref_token_logps.view(shape), mask.view(shape), kl)
        out = KL_ESTIMATORS[self.cfg.regularizer.estimator](sl)
        stats = {"kl": out.kl, "entropy": -(scores.sample_token_logps.detach() * mask).sum(-1),
                 "sample_length": s.response_lengths.float()}
        return self.cfg.loss.beta * out.surrogate.mean(), stats

    def save(self, directory: Path, rank: int) -> None:
        """Write this process's samples into a checkpoint folder (nothing before the first draw)."""
        if self.state is None:
            return
        from safetensors.torch import save_file

        s = self.state.samples
        tensors = {"input_ids": s.rows.input_ids, "attention_mask": s.rows.attention_mask,
                   "response_mask": s.rows.response_mask, "response_lengths": s.response_lengths,
                   "finished": s.finished}
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                  str(directory / SAMPLES.format(rank)),
                  metadata={"num_prompts": str(s.num_prompts), "k": str(s.samples_per_prompt)})

    def load(self, directory: Path, rank: int, device) -> None:
        """Take the samples saved in a checkpoint folder; without them `state` is None and the
        caller redraws them at the last refresh step."""
        path = directory / SAMPLES.format(rank)
        self.state = None
        if not path.is_file():
            return
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta, t = f.metadata(), {k: f.get_tensor(k).to(device) for k in f.keys()}
        samples = SampleBatch(Rows(t["input_ids"], t["attention_mask"], t["response_mask"]),
                              int(meta["num_prompts"]), int(meta["k"]), t["response_lengths"],
                              t["finished"])
        self.state = self.view(samples)
