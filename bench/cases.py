"""What the benchmark compares: model cases x training variants, all on the same synthetic data.

Every run of a case sees the same rows in the same order (sequential, no shuffling, on both sides).
The `Workload` sets the step: by default `PAIRS` = 8 pairs per optimiser step, prompts of 64..128
tokens and responses of 64..127 tokens + EOS, so prompt + response <= `MAX_LENGTH` = 256 and nothing
is ever truncated by either framework (`--pairs` and `--max-length` scale both). Optimiser AdamW, lr
1e-6 constant, grad clipping 1.0, no gradient checkpointing, dropout off, on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Workload:
    """Pairs per optimiser step and the longest prompt + response in tokens. Prompts take a quarter
    to a half of `max_length`, responses a quarter to a half less one, then EOS: no truncation."""

    pairs: int = 8
    max_length: int = 256

    def __post_init__(self):
        if self.pairs < 2 or self.max_length < 16:
            raise ValueError(f"a workload needs >= 2 pairs and max_length >= 16, got {self}")

    @property
    def max_prompt(self) -> int:
        return self.max_length // 2

    @property
    def prompt_tokens(self) -> tuple[int, int]:  # inclusive range of prompt lengths
        return self.max_length // 4, self.max_length // 2

    @property
    def response_tokens(self) -> tuple[int, int]:  # inclusive range, before the EOS token
        return self.max_length // 4, self.max_length // 2 - 1


DEFAULT_WORKLOAD = Workload()
PAIRS = DEFAULT_WORKLOAD.pairs
MAX_LENGTH = DEFAULT_WORKLOAD.max_length


@dataclass(frozen=True)
class Case:
    """A model. `source`: `word` builds a random-init model from `shape` with a word-level tokenizer
    (every word `w<i>` is token i, so lengths are exact); `default` is softpo's cached SmolLM2."""

    name: str
    source: str
    shape: dict = field(default_factory=dict)
    lora: bool = False
    summary: str = ""


CASES = {c.name: c for c in [
    Case("tiny", "word", dict(arch="llama", n_layer=2, n_embd=128, n_head=4, vocab=4096),
         summary="Llama, 2 layers, d=128, vocab 4096 (1.0M params)"),
    Case("gpt2-86m", "word", dict(arch="gpt2", n_layer=12, n_embd=768, n_head=12, vocab=50257),
         summary="GPT-2 small shape: 12 layers, d=768, vocab 50257; 85.8M parameters besides the "
                 "(tied) token embedding, 124.4M with it"),
    Case("smollm2-shape", "word", dict(arch="llama", n_layer=30, n_embd=576, n_head=9, kv_head=3,
                                       ffn=1536, vocab=49152),
         summary="SmolLM2-135M's shape, random weights, word tokenizer (for machines without the "
                 "embedded GGUF, e.g. the GPU rows)"),
    Case("smollm2", "default", summary="SmolLM2-135M-Instruct, full fine-tuning"),
    Case("smollm2-lora", "default", lora=True,
         summary="SmolLM2-135M-Instruct, LoRA r=16 alpha=32 on all linear layers"),
]}


@dataclass(frozen=True)
class Variant:
    """One training configuration. `framework` is `softpo` or `trl`; `method` the loss."""

    name: str
    framework: str
    method: str  # softpo: a loss name; trl: dpo | cpo
    beta: float = 0.1  # DPO inverse temperature; SPO: regulariser weight (0 = off)
    sample_every: int = 1  # SPO regulariser refresh period
    ref_cache: bool = False  # softpo: loss.precompute_ref_logps; trl: precompute_ref_log_probs
    packing: str = "none"  # softpo: model.packing
    full_logits: bool = False  # softpo: `model.full_logits` ([rows, T, vocab] in one block)
    logit_budget: int = 0  # softpo: override logprobs.LOGIT_BUDGET (0: the library's)
    summary: str = ""


VARIANTS = {v.name: v for v in [
    Variant("trl-dpo", "trl", "dpo", summary="TRL DPOTrainer, loss_type=sigmoid, beta=0.1"),
    Variant("trl-dpo-precomputed", "trl", "dpo", ref_cache=True,
            summary="TRL DPOTrainer with precompute_ref_log_probs=True"),
    Variant("trl-cpo", "trl", "cpo", beta=1.0,
            summary="TRL CPOTrainer, loss_type=sigmoid, cpo_alpha=0, beta=1 (= SPO pairwise, alpha=1)"),
    Variant("spo", "softpo", "spo", beta=0.0, summary="softpo SPO, no regulariser"),
    Variant("spo-shared-prompt", "softpo", "spo", beta=0.0, packing="shared_prompt",
            summary="softpo SPO, no regulariser, prompt computed once per pair"),
    Variant("spo-padding-free", "softpo", "spo", beta=0.0, packing="padding_free",
            summary="softpo SPO, no regulariser, [prompt, response] rows packed back to back"),
    Variant("spo-full-logits", "softpo", "spo", beta=0.0, full_logits=True,
            summary="softpo SPO with model.full_logits: the whole [rows, T, vocab] logits of "
                    "one padded block (no chunks, no length groups)"),
    Variant("spo-chunk1024", "softpo", "spo", beta=0.0, logit_budget=1 << 62,
            summary="softpo SPO with 1024-position output-layer chunks whatever the vocabulary "
                    "(before the logit budget)"),
    Variant("spo-reg", "softpo", "spo", beta=0.1, sample_every=1,
            summary="softpo SPO + global KL (token estimator), 4 prompts x 2 samples x 32 tokens, "
                    "sampled every step"),
    Variant("spo-reg-every4", "softpo", "spo", beta=0.1, sample_every=4,
            summary="as spo-reg, sampled every 4 steps"),
    Variant("dpo", "softpo", "dpo", summary="softpo DPO (sigmoid), reference forward each step"),
    Variant("dpo-cached", "softpo", "dpo", ref_cache=True,
            summary="softpo DPO with cached reference log-probs"),
    Variant("dpo-shared-prompt", "softpo", "dpo", packing="shared_prompt",
            summary="softpo DPO, prompt computed once per pair (policy and reference)"),
]}

# The default comparison set and the ratios the targets are stated in.
DEFAULT_VARIANTS = ["trl-dpo", "trl-cpo", "spo", "spo-shared-prompt", "spo-reg", "spo-reg-every4",
                    "dpo", "dpo-cached"]
# (numerator, denominator, kind, target): `speed` = pairs/s ratio (>= target), `time` = step-time
# ratio (<= target), `memory` = peak-RSS ratio (<= target); target None: reported, no target.
RATIOS = [
    ("spo", "trl-cpo", "speed", 1.1), ("spo", "trl-cpo", "memory", 0.8),
    ("spo", "trl-dpo", "speed", 1.45),
    ("spo-shared-prompt", "trl-cpo", "speed", 1.1), ("spo-shared-prompt", "trl-cpo", "memory", 0.8),
    ("spo-shared-prompt", "trl-dpo", "speed", 1.45),
    ("dpo", "trl-dpo", "speed", 1.1), ("dpo", "trl-dpo", "memory", None),
    ("dpo-cached", "trl-dpo", "speed", 1.4), ("dpo-cached", "trl-dpo-precomputed", "speed", None),
    ("dpo-shared-prompt", "trl-dpo", "speed", 1.1),
    ("spo-reg", "trl-dpo", "time", 1.3), ("spo-reg-every4", "trl-dpo", "time", 1.0),
    ("spo-reg", "spo", "time", 1.3),  # full SPO against plain SPO: the regulariser's whole cost
    ("spo-full-logits", "spo", "memory", None), ("spo-full-logits", "spo", "speed", None),
    ("spo-chunk1024", "spo", "memory", None), ("spo-chunk1024", "spo", "speed", None),
]
MFU_TARGET = ("gpt2-86m", "spo", 0.70)  # SPO without the regulariser, >= 70% of the measured peak


def steps_for(variant: Variant, steps: int) -> int:
    """Timed steps: a whole number of sampling periods, so each window holds its share of sampling."""
    period = variant.sample_every if variant.method.startswith("spo") and variant.beta > 0 else 1
    return max(steps, period) // period * period
