"""Human-facing summaries: the model card of a trained run and Markdown tables."""

from __future__ import annotations

from softpo.config import Config

CARD_KEYS = ["loss", "pref_loss", "kl", "entropy", "rewards/accuracies", "rewards/margins",
             "eval_pref_loss", "eval_rewards/accuracies", "eval_rewards/margins"]


SATURATION_WARN = 0.5  # warn when more than this share of the examples starts saturated


def saturation_warning(found: dict[str, float], cfg: Config) -> str | None:
    """One line when most training examples start with a saturated preference term (their
    preference probability under the loss above 0.99, so 1 - p < 1% of their gradient remains):
    the likely cause and the knob. None on healthy data."""
    share = found.get("pref_saturated", 0.0)
    if share <= SATURATION_WARN:
        return None
    loss, margin = cfg.loss.name, found["margin"]
    knob = "loss.alpha" if loss.startswith("spo") else "loss.beta"
    scale = cfg.loss.alpha if loss.startswith("spo") else cfg.loss.beta
    hint = f"; {knob}={1 / abs(margin):.2g} would put alpha*margin at 1" if \
        loss.startswith("spo") and margin else ""
    return (f"softpo: warning: {share:.0%} of {found['examples']:.0f} training examples are already "
            f"explained by the model before training (preference probability > 0.99 under {loss} "
            f"with {knob}={scale:g}; mean log-prob margin chosen - rejected {margin:+.1f} nats), so "
            f"their preference term gives almost no gradient. The preferred responses are already "
            f"far more likely (often: shorter); lower {knob}{hint} (docs/experts.md)")


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table; floats with 4 significant digits."""
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def model_card(cfg: Config, metrics: dict[str, float], merged: bool = False) -> str:
    """The README.md of a trained model: what it is and its final metrics (`merged`: a LoRA run's
    adapter merged into the base weights, `softpo export --merge`)."""
    adapter = "a LoRA adapter for" if cfg.lora.enabled else "a fine-tune of"
    if cfg.lora.enabled and merged:
        adapter = "a fine-tune (a LoRA adapter merged into the weights) of"
    loss = cfg.loss.name
    knobs = f"alpha={cfg.loss.alpha}, beta={cfg.loss.beta}" if loss.startswith("spo") \
        else f"beta={cfg.loss.beta}"
    rows = [[k, metrics[k]] for k in CARD_KEYS if k in metrics]
    return "\n".join([
        "---", "library_name: " + ("peft" if cfg.lora.enabled and not merged else "transformers"),
        "tags: [softpo, preference-optimization, " + loss + "]", "---", "",
        f"# {loss} model trained with softpo", "",
        f"This is {adapter} `{cfg.model.name_or_path}`, aligned with `{loss}` ({knobs}) on "
        f"{f'`{cfg.data.train}`' if cfg.data.train else 'data given in Python'} for "
        f"{cfg.train.max_steps} steps.", "",
        "## Final metrics", "", markdown_table(["metric", "value"], rows), "",
        "The resolved training config is in `config.yaml`.", ""])
