"""Experts that score responses: a Python callable named `module:function`, or a reward model.

Both become a *scorer*: `scorer(prompts, responses) -> list[float]`, one finite reward per
(prompt, response) pair, higher is better. Prompts are passed as given: a string, or a conversation
(a list of `{role, content}` messages); responses are the sampled assistant texts.

A callable spec imports exactly the module it names (nothing is guessed), takes the attribute it
names and checks that it is callable; every way that can fail is a one-line `UserError`. As with
`python -m`, modules in the current directory can be named (it is put on `sys.path`, last, so
that a file there never replaces an installed module softpo imports later).

A reward model is an `AutoModelForSequenceClassification` with one output (`num_labels == 1`),
loaded from safetensors only. It scores the conversation `prompt + [assistant: response]` rendered
with its tokenizer's chat template (when it has one), or the plain text `prompt + response`; the
score is the logit at the last non-pad token (transformers' sequence-classification pooling).
"""

from __future__ import annotations

import importlib
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from softpo.errors import UserError

SPEC = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
Scorer = Callable[[list, list[str]], list[float]]


def load_callable(spec: str) -> Callable[[Any, str], float]:
    """`package.module:function` -> the function. UserError for a malformed spec, a module that
    cannot be imported, a missing attribute, or one that is not callable."""
    if not SPEC.fullmatch(spec or ""):
        raise UserError(f"expert '{spec}' must look like package.module:function "
                        "(a Python module path, a colon, a function name)")
    module_name, name = spec.split(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # last: a file here must not shadow an installed module
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = f"module '{e.name}' not found" if e.name else str(e)
        raise UserError(f"expert '{spec}': cannot import '{module_name}': {missing}") from None
    except Exception as e:  # the module itself raised while importing
        raise UserError(f"expert '{spec}': importing '{module_name}' failed: "
                        f"{type(e).__name__}: {_one_line(e)}") from None
    if not hasattr(module, name):
        raise UserError(f"expert '{spec}': module '{module_name}' has no attribute '{name}'")
    fn = getattr(module, name)
    if not callable(fn):
        raise UserError(f"expert '{spec}': '{name}' is a {type(fn).__name__}, not a callable")
    return fn


def callable_scorer(fn: Callable[[Any, str], float], spec: str) -> Scorer:
    """Call `fn(prompt, response)` per pair; a non-number, non-finite value or exception is a
    one-line UserError naming the expert and the prompt."""
    def score(prompts: list, responses: list[str]) -> list[float]:
        out = []
        for prompt, response in zip(prompts, responses):
            try:
                value = fn(prompt, response)
            except UserError:
                raise
            except Exception as e:
                raise UserError(f"expert '{spec}' raised {type(e).__name__}: {_one_line(e)} "
                                f"(prompt {prompt_label(prompt)})") from None
            out.append(_check_reward(value, spec, prompt))
        return out
    return score


def _check_reward(value: Any, spec: str, prompt: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # numpy / 0-d torch scalars
        except (TypeError, ValueError):
            raise UserError(f"expert '{spec}' returned {type(value).__name__} {value!r:.40}; "
                            f"expected a number (prompt {prompt_label(prompt)})") from None
    if not math.isfinite(value):
        raise UserError(f"expert '{spec}' returned {value}; rewards must be finite "
                        f"(prompt {prompt_label(prompt)})")
    return float(value)


def prompt_label(prompt: Any, width: int = 60) -> str:
    """A prompt named in one line: its text (a conversation: its last message), quoted, cut to
    `width` characters."""
    text = prompt if isinstance(prompt, str) else str((prompt or [{}])[-1].get("content", prompt))
    text = " ".join(text.split())
    return repr(text if len(text) <= width else text[:width - 3] + "...")


def _one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


# ---------------------------------------------------------------- reward models

class RewardModel:
    """A sequence-classification reward model as a scorer (batched, no gradients)."""

    def __init__(self, name_or_path: str, batch_size: int = 8, max_length: int = 1024,
                 device: str | torch.device = "cpu"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = Path(name_or_path).expanduser()
        if folder.is_dir() and not any(folder.glob("*.safetensors")):
            raise UserError(f"reward model '{name_or_path}': no *.safetensors weights in {folder} "
                            "(softpo never unpickles .bin weights)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder) if folder.is_dir()
                                                           else name_or_path)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                str(folder) if folder.is_dir() else name_or_path, use_safetensors=True,
                dtype=torch.float32).to(device).eval()
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"cannot load reward model '{name_or_path}': {_one_line(e)}") from None
        if self.model.config.num_labels != 1:
            raise UserError(f"reward model '{name_or_path}' has {self.model.config.num_labels} "
                            "outputs; a reward model has one (num_labels = 1)")
        self.pad_id = self.model.config.pad_token_id  # pooling finds the last token != pad_id
        self.batch_size = batch_size if self.pad_id is not None else 1
        self.max_length, self.device = max_length, device

    def text(self, prompt: Any, response: str) -> tuple[str, bool]:
        """The scored text, and whether it is already a rendered chat (no extra special tokens)."""
        if isinstance(prompt, list):
            messages = prompt + [{"role": "assistant", "content": response}]
            if self.tokenizer.chat_template:
                return self.tokenizer.apply_chat_template(messages, tokenize=False), True
            return "\n".join(f"{m['role']}: {m['content']}" for m in messages), False
        return prompt + response, False

    @torch.no_grad()
    def __call__(self, prompts: list, responses: list[str]) -> list[float]:
        scores: list[float] = []
        pairs = list(zip(prompts, responses))
        for start in range(0, len(pairs), self.batch_size):
            ids = []
            for prompt, response in pairs[start:start + self.batch_size]:
                text, rendered = self.text(prompt, response)
                ids.append(self.tokenizer(text, add_special_tokens=not rendered, truncation=True,
                                          max_length=self.max_length)["input_ids"])
            width = max(len(x) for x in ids)
            pad = self.pad_id if self.pad_id is not None else 0
            input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])  # (B, T)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])  # (B, T)
            logits = self.model(input_ids=input_ids.to(self.device),
                                attention_mask=mask.to(self.device)).logits  # (B, 1)
            scores += [float(v) for v in logits[:, 0].float().cpu()]
        return scores


def load_scorer(expert: str | None, reward_model: str | None, device: str = "cpu",
                batch_size: int = 8) -> tuple[Scorer, str]:
    """Exactly one of `expert` (module:function) or `reward_model` (path / hub name) -> (scorer,
    description)."""
    if (expert is None) == (reward_model is None):
        raise UserError("give exactly one of --expert module:function or --reward-model PATH")
    if expert is not None:
        return callable_scorer(load_callable(expert), expert), expert
    return RewardModel(reward_model, batch_size=batch_size, device=device), reward_model
