"""Task families shipped with softpo: prompts with a programmatic, verifiable expert reward.

A task module defines `make_prompts(split, n, seed, **options) -> list[prompt]` (splits `train` and
`test`, disjoint), `reward(prompt, response) -> float` and `SUCCESS_THRESHOLD` (a response with at
least this reward is a success); a task whose answers form an enumerable set also defines
`candidate_rows(split, n, seed, **options) -> list[{prompt, candidates, rewards}]` (the prompts of
`make_prompts` with every candidate answer and its reward, for `softpo.candidates`). `TASKS` maps
a task name to its module and the options its prompts are made with; `get_task(name)` loads it.
Every reward is also usable by name as an expert: `--expert softpo.tasks.arithmetic:reward`.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Callable

from softpo.errors import UserError

# name -> (module, options for make_prompts, one-line description)
TASKS: dict[str, tuple[str, dict, str]] = {
    "arithmetic": ("softpo.tasks.arithmetic", {},
                   "sums, differences, larger and smaller of two numbers, in turn"),
    "arithmetic-compare": ("softpo.tasks.arithmetic", {"kinds": ("larger", "smaller")},
                           "larger or smaller of two numbers"),
    "arithmetic-sums": ("softpo.tasks.arithmetic", {"kinds": ("add", "sub")},
                        "sums and differences of numbers up to 20"),
    "choices": ("softpo.tasks.choices", {},
                "questions with many right answers (numbers in a range, primes, multiples, even "
                "and odd numbers, letters of a word, months, days, planets, colours), in turn"),
    "choices-numbers": ("softpo.tasks.choices",
                        {"families": ("range", "primes", "multiples", "parity")},
                        "name a number, prime, multiple of k, even or odd number in a range"),
    "choices-words": ("softpo.tasks.choices", {"families": ("spelling", "words")},
                      "name a letter of a word, a month, a day, a planet, a colour, a vowel"),
}


@dataclass(frozen=True)
class Task:
    """A shipped task: its prompts, its expert reward and, where its answers form an enumerable
    set, its candidate rows."""

    name: str
    make_prompts: Callable[..., list]  # (split, n, seed) -> prompts
    reward: Callable[..., float]  # (prompt, response) -> float
    success_threshold: float
    reward_spec: str  # `module:function`, for --expert
    description: str = ""
    candidate_rows: Callable[..., list[dict]] | None = None  # (split, n, seed) -> rows, or None


def get_task(name: str) -> Task:
    """The task registered as `name` in `TASKS` (a UserError names the known ones)."""
    if name not in TASKS:
        raise UserError(f"unknown task '{name}' (known: {', '.join(sorted(TASKS))})")
    module_name, options, description = TASKS[name]
    module = importlib.import_module(module_name)
    rows = getattr(module, "candidate_rows", None)
    return Task(name, functools.partial(module.make_prompts, **options), module.reward,
                module.SUCCESS_THRESHOLD, f"{module_name}:reward", description,
                functools.partial(rows, **options) if rows is not None else None)
