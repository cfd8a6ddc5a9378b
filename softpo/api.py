"""The Python entry point: `softpo.train(...)`, what `softpo train` does, from a notebook or script.

    import softpo

    metrics = softpo.train("configs/tiny.yaml", "train.max_steps=5")
    metrics = softpo.train(cfg, model=my_model, tokenizer=my_tokenizer, train_dataset=my_dataset)

For the trained model itself, build a `softpo.Trainer` (the same parts as keywords) and read
`Trainer.model` after `Trainer.train()`. docs/python.md has the whole API with a worked example.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from softpo.config import Config, load_config
from softpo.trainer import Trainer


def train(config_or_path: Config | str | Path | None = None, *overrides: str, model=None,
          tokenizer=None, train_dataset: Any = None, eval_dataset: Any = None) -> dict[str, float]:
    """Train as `softpo train` does and return the final metrics: the last logged training
    metrics and the held-out ones (`eval_*`).

    `config_or_path` is a YAML file or a `Config` built in Python (validated alike, with the same
    one-line `UserError`s), then the dotted `overrides` such as `"loss.name=dpo"`. Optional parts
    of one's own: `model`, a causal LM (with its `tokenizer`); `train_dataset` / `eval_dataset`,
    a path or hub name, a `datasets.Dataset`, or a list of dicts in any of softpo's row formats.
    The run directory (`train.output_dir`) receives the config, metrics, checkpoints and `final/`.
    SIGTERM or SIGINT while training: the step finishes, a checkpoint is written and
    `softpo.preemption.Preempted` is raised (its message says where; `softpo train` exits with
    code 75); the same call with `"train.resume=true"` continues exactly.
    """
    cfg = load_config(config_or_path, list(overrides))
    trainer = Trainer(cfg, tokenizer=tokenizer, model=model, train_dataset=train_dataset,
                      eval_dataset=eval_dataset)
    return trainer.train()
