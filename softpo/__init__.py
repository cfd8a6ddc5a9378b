"""softpo: Soft Preference Optimization (SPO) and DPO-family preference alignment.

The public face (docs/python.md), loaded lazily so that `import softpo` and `softpo --help` start fast:

    softpo.train(config_or_path, *overrides, model=None, tokenizer=None, train_dataset=None,
                 eval_dataset=None) -> metrics
    softpo.Trainer(config, model=..., tokenizer=..., train_dataset=..., eval_dataset=...)
                                                   (`.train()`, then `.model` is the trained model)
    softpo.Config, softpo.load_config, softpo.UserError
    softpo.losses.register                         (add a loss; `loss.module` makes the CLI load it)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute); None: the module itself
_LAZY = {
    "train": ("softpo.api", "train"),
    "Trainer": ("softpo.trainer", "Trainer"),
    "Config": ("softpo.config", "Config"),
    "load_config": ("softpo.config", "load_config"),
    "UserError": ("softpo.errors", "UserError"),
    "losses": ("softpo.losses", None),
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'softpo' has no attribute '{name}'")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    return module if attribute is None else getattr(module, attribute)


def __dir__() -> list[str]:
    return sorted(__all__ + [name for name in globals() if name.startswith("__")])
