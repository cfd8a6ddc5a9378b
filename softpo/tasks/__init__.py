"""Task families shipped with softpo: prompts with a programmatic, verifiable expert reward.

A task module defines `make_prompts(split, n, seed) -> list[prompt]` (splits `train` and `test`,
disjoint), `reward(prompt, response) -> float` and `SUCCESS_THRESHOLD` (a response with at least
this reward is a success). `TASKS` maps a task name to its module; `get_task(name)` loads it.
Every reward is also usable by name as an expert: `--expert softpo.tasks.<name>:reward`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from softpo.errors import UserError

TASKS: dict[str, str] = {
    "arithmetic": "softpo.tasks.arithmetic",
}


@dataclass(frozen=True)
class Task:
    name: str
    make_prompts: Callable[..., list]  # (split, n, seed) -> prompts
    reward: Callable[..., float]  # (prompt, response) -> float
    success_threshold: float
    reward_spec: str  # `module:function`, for --expert

    def __repr__(self) -> str:
        return f"Task({self.name!r})"


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"unknown task '{name}' (known: {', '.join(sorted(TASKS))})")
    module = importlib.import_module(TASKS[name])
    return Task(name, module.make_prompts, module.reward, module.SUCCESS_THRESHOLD,
                f"{TASKS[name]}:reward")
