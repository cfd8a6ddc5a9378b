"""Arithmetic questions with known answers: a verifiable expert for the main demo.

Each prompt is a short chat: a system message, `SHOTS` worked examples of the same kind (so that a
small instruct model knows the expected form), then the question:

    system:    You are a calculator. Reply with only the number.
    user:      Which is larger, 3 or 8?      assistant: 8
    user:      Which is larger, 61 or 25?    assistant: 61
    user:      Which is larger, 31 or 58?

Question kinds (`KINDS`): `add` a + b, `sub` a - b (never negative), `larger` / `smaller` of two
numbers. The answer is recomputed from the question text, so `reward` needs nothing but the prompt.

Reward (`reward(prompt, response)`, in [0, 1]), for the integer answer `c`:

    1.0                              the response is exactly `c` (surrounding whitespace and one
                                     trailing period allowed)
    0.5 - 0.25 * min(1, extra / 48)  correct but wordy: the first integer in the response is `c`, or
                                     it states `= c`; `extra` = characters beyond those of `c`
    0.1                              a bare integer, but the wrong one (format followed)
    0.0                              anything else

A response counts as a success when its reward is 1.0 (`SUCCESS_THRESHOLD`).

Splits: every question is assigned to `train` or `test` by a hash of its operands (the unordered
pair for symmetric kinds), independently of any seed, so the two splits never share a question and
`3 + 4` / `4 + 3` always fall on the same side. `make_prompts(split, n, seed)` draws from one split,
cycling through the kinds, deterministically for a given seed.

Measured on SmolLM2-135M-Instruct (`--model default`), pure sampling at temperature 1:
expected success rate by teacher forcing (`success_probability`, 48 held-out questions per kind)

    worked examples   add    sub    larger  smaller  all kinds
    2 (SHOTS)         0.058  0.070  0.445   0.435    0.252
    1                 0.030  0.051  0.278   0.222    0.145
    0                 0.000  0.000  0.001   0.001    0.001

and, sampled (`softpo build-prefs --task arithmetic --num-prompts 64 -n 4 --max-new-tokens 16`,
seed 0): success 66/256 = 0.258; rewards 1.0: 25.8%, 0.1 (a wrong bare number): 63.3%, partial
credit: 0.4%, 0: 10.5%; mean 0.323.
"""

from __future__ import annotations

import functools
import random
import re
import zlib
from dataclasses import dataclass
from typing import Callable

from softpo.errors import UserError

SYSTEM = "You are a calculator. Reply with only the number."
SHOTS = 2  # worked examples before each question (0 gives ~0% success: see the table above)
SUCCESS_THRESHOLD = 1.0
SPLITS = ("train", "test")
TEST_SHARE = 4  # one question in TEST_SHARE (by hash) is held out
WORDY_SPAN = 48  # extra characters over which partial credit falls from 0.5 to 0.25


@dataclass(frozen=True)
class Kind:
    """A question kind: its text, its operands and its answer."""

    template: str  # question text with {a} and {b}
    operands: Callable[[], list[tuple[int, int]]]  # the question space
    answer: Callable[[int, int], int]
    symmetric: bool  # (a, b) and (b, a) are the same question for splitting
    examples: tuple[tuple[int, int], ...]  # worked examples shown before the question

    @property
    def pattern(self) -> re.Pattern:
        """The regular expression that reads the operands back from a question."""
        escaped = re.escape(self.template).replace(r"\{a\}", r"(\d+)").replace(r"\{b\}", r"(\d+)")
        return re.compile(escaped)


def _pairs(lo: int, hi: int, keep=lambda a, b: True) -> Callable[[], list[tuple[int, int]]]:
    return lambda: [(a, b) for a in range(lo, hi + 1) for b in range(lo, hi + 1) if keep(a, b)]


KINDS: dict[str, Kind] = {
    "add": Kind("What is {a} + {b}?", _pairs(1, 20), lambda a, b: a + b, True, ((3, 4), (12, 5))),
    "sub": Kind("What is {a} - {b}?", _pairs(1, 20, lambda a, b: a > b), lambda a, b: a - b, False,
                ((9, 5), (17, 3))),
    "larger": Kind("Which is larger, {a} or {b}?", _pairs(1, 99, lambda a, b: a != b), max, True,
                   ((3, 8), (61, 25))),
    "smaller": Kind("Which is smaller, {a} or {b}?", _pairs(1, 99, lambda a, b: a != b), min, True,
                    ((3, 8), (61, 25))),
}


# ---------------------------------------------------------------- prompts

def split_of(kind: str, a: int, b: int) -> str:
    """`train` or `test`, from a stable hash (crc32) of the question, never from a seed."""
    x, y = (min(a, b), max(a, b)) if KINDS[kind].symmetric else (a, b)
    return "test" if zlib.crc32(f"{kind}:{x}:{y}".encode()) % TEST_SHARE == 0 else "train"


@functools.lru_cache(maxsize=None)
def questions(kind: str, split: str) -> tuple[tuple[int, int], ...]:
    """All operand pairs of `kind` in `split`, in a fixed order; the worked examples (either
    order, for symmetric kinds) are never asked."""
    spec = KINDS[kind]
    shown = set(spec.examples) | ({(b, a) for a, b in spec.examples} if spec.symmetric else set())
    return tuple((a, b) for a, b in spec.operands()
                 if (a, b) not in shown and split_of(kind, a, b) == split)


def conversation(kind: str, question: str, shots: int | None = None) -> list[dict[str, str]]:
    """System message, `shots` worked examples of `kind`, then the question."""
    spec = KINDS[kind]
    messages = [{"role": "system", "content": SYSTEM}]
    for a, b in spec.examples[:SHOTS if shots is None else shots]:
        messages += [{"role": "user", "content": spec.template.format(a=a, b=b)},
                     {"role": "assistant", "content": str(spec.answer(a, b))}]
    return messages + [{"role": "user", "content": question}]


def make_questions(split: str, n: int, seed: int, kinds: tuple[str, ...] | None = None) -> list[dict]:
    """n questions `{kind, a, b, question, answer}` from `split`: kinds in turn, each kind's
    questions in a seeded random order (reshuffled when one runs out)."""
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}' (known: {', '.join(SPLITS)})")
    if n < 0:
        raise UserError(f"number of prompts must be >= 0, got {n}")
    kinds = tuple(kinds or KINDS)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise UserError(f"unknown question kind '{unknown[0]}' (known: {', '.join(KINDS)})")
    rng = random.Random(f"arithmetic:{split}:{seed}")
    pools = {k: [] for k in kinds}
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        if not pools[kind]:
            pools[kind] = list(questions(kind, split))
            rng.shuffle(pools[kind])
        a, b = pools[kind].pop()
        spec = KINDS[kind]
        out.append({"kind": kind, "a": a, "b": b, "question": spec.template.format(a=a, b=b),
                    "answer": spec.answer(a, b)})
    return out


def make_prompts(split: str, n: int, seed: int = 0,
                 kinds: tuple[str, ...] | None = None) -> list[list[dict[str, str]]]:
    """n chat prompts (lists of {role, content}) from `split`, deterministic for a seed."""
    return [conversation(q["kind"], q["question"]) for q in make_questions(split, n, seed, kinds)]


# ---------------------------------------------------------------- reward

def question_text(prompt: str | list[dict[str, str]]) -> str:
    """The question asked: the last user message of a conversation, or the string itself."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    return users[-1] if users else ""


def answer_for(prompt: str | list[dict[str, str]]) -> int:
    """The integer answer to the (last) question in a prompt; UserError if there is none."""
    text = question_text(prompt)
    for spec in KINDS.values():
        found = list(spec.pattern.finditer(text))
        if found:
            a, b = (int(g) for g in found[-1].groups())
            return spec.answer(a, b)
    raise UserError(f"not an arithmetic task prompt (no known question in {text[:60]!r})")


INTEGER = re.compile(r"-?\d+")
BARE = re.compile(r"\s*(-?\d+)\.?\s*")


def score(answer: int, response: str) -> float:
    """The reward of `response` to a question whose answer is `answer` (table in the module doc)."""
    bare = BARE.fullmatch(response)
    if bare:
        return 1.0 if int(bare.group(1)) == answer else 0.1
    numbers = INTEGER.findall(response)
    states = re.search(rf"=\s*{answer}(?!\d)", response) is not None
    if (numbers and int(numbers[0]) == answer) or states:
        extra = max(0, len(response.strip()) - len(str(answer)))
        return 0.5 - 0.25 * min(1.0, extra / WORDY_SPAN)
    return 0.0


def reward(prompt: str | list[dict[str, str]], response: str) -> float:
    """Expert reward for `softpo build-prefs --expert softpo.tasks.arithmetic:reward`."""
    return score(answer_for(prompt), response)


# ---------------------------------------------------------------- exact success probability

def success_probability(model, tokenizer, prompts: list, batch_size: int = 16,
                        data_cfg=None) -> list[float]:
    """Per prompt, the probability that one pure sample is a success, by teacher forcing:

        P(success | x) >= sum over forms y in {"c", "c."} of pi(y + end-of-turn | x)

    (each form in the tokenizer's own tokenisation; other tokenisations and whitespace variants
    also succeed but are not counted, so this is a lower bound, tight in practice). It has no
    sampling noise: the mean over prompts is the expected success rate of a sampled evaluation.
    Prompts are encoded as training encodes them (`softpo.collate.encode_prompt` with `data_cfg`,
    default `DataConfig()`)."""
    import torch

    from softpo.collate import encode_prompt
    from softpo.config import DataConfig
    from softpo.logprobs import sequence_logps

    data_cfg = data_cfg or DataConfig()
    rows = []  # (prompt index, prompt ids, response ids)
    for i, prompt in enumerate(prompts):
        prompt_ids = encode_prompt(prompt, tokenizer, data_cfg)
        c = str(answer_for(prompt))
        for form in (c, c + "."):
            rows.append((i, prompt_ids, tokenizer(form, add_special_tokens=False)["input_ids"]
                         + [tokenizer.eos_token_id]))
    probs = [0.0] * len(prompts)
    device = next(model.parameters()).device
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(p) + len(r) for _, p, r in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
        attn = torch.zeros_like(ids)
        resp = torch.zeros_like(ids, dtype=torch.bool)
        for j, (_, p, r) in enumerate(chunk):
            ids[j, :len(p) + len(r)] = torch.tensor(p + r)
            attn[j, :len(p) + len(r)] = 1
            resp[j, len(p):len(p) + len(r)] = True
        with torch.no_grad():
            logps = sequence_logps(model, ids.to(device), attn.to(device), resp.to(device))  # (B,)
        for (i, _, _), lp in zip(chunk, logps.exp().tolist()):
            probs[i] += lp
    return probs
