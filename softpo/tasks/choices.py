"""Questions with many right answers: "Name a letter in the word "GARDEN"."

Each question has a finite, enumerable set of canonical answers, the *candidates* (right and
wrong ones), of which several are correct: for number questions every integer 0..120, for letter
questions the 26 letters, for months the 12 months. So the whole bare-answer distribution of a
model can be enumerated exactly (`softpo.candidates`), and among equally correct answers the
expert distribution is known: with the reward below (1 for the correct candidates, 0 for the
others) softmax(r / alpha) gives every correct candidate the same share, for every alpha.

Families (`FAMILIES`; `questions(family, split)` enumerates a family's questions):

    range      Name a number greater than {a} and less than {b}.   0 <= a < 50, 2..8 answers
    primes     Name a prime number between {a} and {b}.            0 <= a < b <= 50, b - a in
                                                                    6..20, >= 2 primes
    multiples  Name a multiple of {k} between {a} and {b}.         k in 3..9, b <= 60, 2..5
                                                                    multiples
    parity     Name an even (odd) number between {a} and {b}.      a < 40, 2..6 answers
    spelling   Name a letter in the word "{WORD}".                 110 common words: the word's
                                                                    distinct letters
    words      fixed questions over small closed sets: months (with 31 days, with 30 days, ...),
               days of the week, planets, colours, vowels and consonants (`WORD_QUESTIONS`)

In `primes`, `multiples` and `parity` the endpoints are never right answers, so whether
"between" includes them does not matter. Candidates are the canonical forms the worked examples
use: integers in decimal, capital letters, capitalised words; other spellings of a right answer
("july", "17.") still earn reward 1 but are not candidates, so the success probability summed
over candidates is a lower bound (tight in practice: the examples show the canonical form).

Each prompt is a short chat, as in `softpo.tasks.arithmetic`: a system message, `SHOTS` worked
examples, then the question. The examples of the number families and of `spelling` are of the
same family with parameters outside its question space; those of `words` are single-answer
questions over the same set ("Name the month with 28 days."). No example is ever asked:

    system:    Answer with one number or one word only.
    user:      Name a letter in the word "FOX".       assistant: O
    user:      Name a letter in the word "JUMP".      assistant: J
    user:      Name a letter in the word "GARDEN".

Reward (`reward(prompt, response)`, in [0, 1]); the question, its candidates and its correct set
are recomputed from the prompt text alone (`question_for`, `candidates`, `correct`):

    1.0                              a bare correct answer: surrounding whitespace and one trailing
                                     period allowed, case ignored for words and letters
    0.5 - 0.25 * min(1, extra / 48)  correct but wordy: the first candidate token of the response
                                     (its first integer; the first word that is a candidate; for
                                     letter questions the first one-letter word) is correct;
                                     `extra` = characters beyond those of that answer
    0.0                              anything else (a wrong answer, or no candidate at all)

A response counts as a success when its reward is 1.0 (`SUCCESS_THRESHOLD`).

Splits: every question goes to `train` or `test` by a stable hash (crc32) of its family and
parameters, never by a seed, so the splits share no question and no parameters. `words` has 23
questions (7 held out); a family whose split runs out of questions repeats them.

Measured on SmolLM2-135M-Instruct (`--model default`), exactly by teacher forcing
(`softpo.candidates`, packed layout, temperature 1, seed 0), 24 held-out questions per family
(the 7 held-out questions of `words`). success: probability that one pure sample is a correct
candidate; outside: mass on responses that are no candidate; correct/cands: mean number of
correct answers and of candidates; then, among the correct candidates, the model's normalised
entropy (1 = uniform, the expert's), the share of the most likely one and the coverage (share of
correct candidates holding at least half their uniform share):

    family     success  outside  correct/cands  entropy  top share  coverage
    range      0.110    0.168     5.4 / 121     0.908    0.385      0.891
    primes     0.082    0.335     3.4 / 121     0.749    0.617      0.690
    multiples  0.089    0.138     3.2 / 121     0.738    0.624      0.703
    parity     0.099    0.236     4.5 / 121     0.821    0.502      0.733
    spelling   0.724    0.177     5.1 / 26      0.338    0.821      0.292
    words      0.378    0.367     4.7 / 9       0.739    0.573      0.646

The number families are hard for this model (about 0.1: two to three times a uniformly random
candidate); `spelling` (mostly the word's first letter: "G" for GARDEN) and `words` are where it is
often right and far from uniform among the right answers (`--task choices-words`).
"""

from __future__ import annotations

import functools
import random
import re
import string
import zlib
from dataclasses import dataclass
from typing import Callable

from softpo.errors import UserError

SYSTEM = "Answer with one number or one word only."
SHOTS = 2  # worked examples before each question
SUCCESS_THRESHOLD = 1.0
SPLITS = ("train", "test")
TEST_SHARE = 4  # one question in TEST_SHARE (by hash) is held out
WORDY_SPAN = 48  # extra characters over which partial credit falls from 0.5 to 0.25
NUMBER_MAX = 120  # number questions: the candidates are 0..NUMBER_MAX


@dataclass(frozen=True)
class Question:
    """One question: its text, every candidate answer (canonical forms) and the correct ones."""

    family: str
    params: tuple  # what the split hash sees
    text: str
    candidates: tuple[str, ...]  # duplicate-free, canonical forms
    correct: frozenset[str]  # a subset of `candidates`, >= 2 answers

    @property
    def numeric(self) -> bool:
        return self.family in NUMERIC


# ---------------------------------------------------------------- the families

def is_prime(n: int) -> bool:
    """True for 2, 3, 5, 7, 11, ... (trial division)."""
    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))


NUMBERS = tuple(str(n) for n in range(NUMBER_MAX + 1))
LETTERS = tuple(string.ascii_uppercase)


def _numbers(family: str, params: tuple, text: str, right: Callable[[int], bool]) -> Question:
    """A question whose candidates are the integers 0..NUMBER_MAX."""
    return Question(family, params, text, NUMBERS,
                    frozenset(c for c in NUMBERS if right(int(c))))


def _range(a: int, b: int) -> Question:
    return _numbers("range", (a, b), f"Name a number greater than {a} and less than {b}.",
                    lambda n: a < n < b)


def _primes(a: int, b: int) -> Question:
    return _numbers("primes", (a, b), f"Name a prime number between {a} and {b}.",
                    lambda n: a < n < b and is_prime(n))


def _multiples(k: int, a: int, b: int) -> Question:
    return _numbers("multiples", (k, a, b), f"Name a multiple of {k} between {a} and {b}.",
                    lambda n: a < n < b and n % k == 0)


def _parity(kind: str, a: int, b: int) -> Question:
    rest = 0 if kind == "even" else 1
    return _numbers("parity", (kind, a, b), f"Name an {kind} number between {a} and {b}.",
                    lambda n: a < n < b and n % 2 == rest)


def _spelling(word: str) -> Question:
    return Question("spelling", (word,), f'Name a letter in the word "{word}".', LETTERS,
                    frozenset(word))


def _range_space() -> list[tuple]:
    return [(a, b) for a in range(0, 50) for b in range(a + 3, a + 10)]


def _prime_space() -> list[tuple]:
    return [(a, b) for a in range(0, 45) for b in range(a + 6, min(a + 20, 50) + 1)
            if not is_prime(a) and not is_prime(b) and sum(map(is_prime, range(a, b))) >= 2]


def _multiple_space() -> list[tuple]:
    return [(k, a, b) for k in range(3, 10) for a in range(1, 60) for b in range(a + 1, 61)
            if a % k and b % k and 2 <= b // k - a // k <= 5]


def _parity_space() -> list[tuple]:
    return [(kind, a, b) for kind, rest in (("even", 0), ("odd", 1)) for a in range(0, 40)
            for b in range(a + 4, a + 13, 2) if a % 2 != rest]


SPELLING_WORDS = (
    "ANCHOR", "APPLE", "BASKET", "BEACH", "BREAD", "BRIDGE", "BUTTON", "CANDLE", "CANDY", "CASTLE",
    "CHAIR", "CIRCLE", "CLOCK", "CLOUD", "COFFEE", "DOCTOR", "DRAGON", "EAGLE", "ENGINE", "FINGER",
    "FLOWER", "FOREST", "GARDEN", "GRAPE", "GUITAR", "HAMMER", "HORSE", "HOUSE", "ISLAND",
    "JACKET", "KITTEN", "KNIFE", "LADDER", "LEMON", "LIGHT", "MANGO", "MARKET", "MIRROR", "MUSIC",
    "NEEDLE", "OCEAN", "ORANGE", "PAPER", "PENCIL", "PEPPER", "PHONE", "PLANET", "PLANT", "PLATE",
    "RABBIT", "RIVER", "ROCKET", "SADDLE", "SHEEP", "SHIRT", "SILVER", "SNAKE", "SPOON", "STONE",
    "STORM", "SUGAR", "SUMMER", "TABLE", "TIGER", "TRAIN", "TRUCK", "TUNNEL", "VELVET", "WALLET",
    "WATER", "WINDOW", "WINTER", "YELLOW", "ZIPPER", "BOTTLE", "CAMERA", "DESERT", "FARMER",
    "GOBLIN", "HELMET", "INSECT", "JUNGLE", "KETTLE", "LIZARD", "MAGNET", "NAPKIN", "OYSTER",
    "PARROT", "QUARTZ", "RIBBON", "SOCKET", "TOMATO", "VIOLIN", "WIZARD", "BANJO", "CRANE",
    "DANCE", "FLUTE", "GHOST", "HONEY", "JUICE", "LUNCH", "MOUSE", "NORTH", "PIANO", "QUEEN",
    "ROBOT", "SALAD", "TOWEL", "WHALE",
)

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
PLANETS = ("Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune")
COLOURS = ("Red", "Orange", "Yellow", "Green", "Blue", "Indigo", "Violet", "Purple", "Pink",
           "Brown", "Black", "White", "Grey")

# group -> (candidates, worked examples (question, answer): single-answer questions, never asked)
WORD_GROUPS: dict[str, tuple[tuple[str, ...], tuple[tuple[str, str], ...]]] = {
    "months": (MONTHS, (("Name the month with 28 days.", "February"),
                        ("Name the last month of the year.", "December"))),
    "days": (DAYS, (("Name the first day of the week.", "Monday"),
                    ("Name the day after Friday.", "Saturday"))),
    "planets": (PLANETS, (("Name the planet we live on.", "Earth"),
                          ("Name the planet closest to the Sun.", "Mercury"))),
    "colours": (COLOURS, (("Name the colour of grass.", "Green"),
                          ("Name the colour of snow.", "White"))),
    "letters": (LETTERS, (("Name the first letter of the alphabet.", "A"),
                          ("Name the last letter of the alphabet.", "Z"))),
}
# question -> (group, correct answers)
WORD_QUESTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "Name a month with 31 days.": ("months", ("January", "March", "May", "July", "August",
                                              "October", "December")),
    "Name a month with 30 days.": ("months", ("April", "June", "September", "November")),
    "Name a month whose name starts with J.": ("months", ("January", "June", "July")),
    "Name a month whose name starts with M.": ("months", ("March", "May")),
    "Name a month whose name ends in 'ber'.": ("months", ("September", "October", "November",
                                                          "December")),
    "Name a month in the first half of the year.": ("months", MONTHS[:6]),
    "Name a month in the second half of the year.": ("months", MONTHS[6:]),
    "Name a month of the year.": ("months", MONTHS),
    "Name a day of the week.": ("days", DAYS),
    "Name a weekday from Monday to Friday.": ("days", DAYS[:5]),
    "Name a day of the weekend.": ("days", DAYS[5:]),
    "Name a day of the week that starts with T.": ("days", ("Tuesday", "Thursday")),
    "Name a day of the week that starts with S.": ("days", ("Saturday", "Sunday")),
    "Name a planet of the solar system.": ("planets", PLANETS),
    "Name a planet larger than Earth.": ("planets", ("Jupiter", "Saturn", "Uranus", "Neptune")),
    "Name a planet smaller than Earth.": ("planets", ("Mercury", "Venus", "Mars")),
    "Name a planet farther from the Sun than Earth.": ("planets", PLANETS[3:]),
    "Name a planet whose name starts with M.": ("planets", ("Mercury", "Mars")),
    "Name a colour of the rainbow.": ("colours", COLOURS[:7]),
    "Name a primary colour of paint.": ("colours", ("Red", "Yellow", "Blue")),
    "Name a colour of the French flag.": ("colours", ("Blue", "White", "Red")),
    "Name a vowel.": ("letters", ("A", "E", "I", "O", "U")),
    "Name a consonant.": ("letters", tuple(c for c in LETTERS if c not in "AEIOUY")),
}


def _words(text: str) -> Question:
    group, right = WORD_QUESTIONS[text]
    return Question("words", (text,), text, WORD_GROUPS[group][0], frozenset(right))


@dataclass(frozen=True)
class Family:
    """A question family: how to build its questions, its question space, how to read one back
    from its text, and the worked examples shown before its questions."""

    build: Callable[..., Question]  # params -> Question
    space: Callable[[], list[tuple]]  # every parameter tuple that may be asked
    pattern: re.Pattern  # question text -> parameters (as strings)
    parse: Callable[[tuple[str, ...]], tuple]  # matched groups -> params
    examples: tuple[tuple[str, str], ...]  # worked examples (question, answer), never asked


_INTS = lambda groups: tuple(int(g) for g in groups)  # noqa: E731
FAMILIES: dict[str, Family] = {
    "range": Family(_range, _range_space,
                    re.compile(r"Name a number greater than (\d+) and less than (\d+)\."), _INTS,
                    (("Name a number greater than 100 and less than 104.", "102"),
                     ("Name a number greater than 60 and less than 63.", "61"))),
    "primes": Family(_primes, _prime_space,
                     re.compile(r"Name a prime number between (\d+) and (\d+)\."), _INTS,
                     (("Name a prime number between 100 and 105.", "101"),
                      ("Name a prime number between 60 and 66.", "61"))),
    "multiples": Family(_multiples, _multiple_space,
                        re.compile(r"Name a multiple of (\d+) between (\d+) and (\d+)\."), _INTS,
                        (("Name a multiple of 10 between 95 and 115.", "100"),
                         ("Name a multiple of 11 between 70 and 80.", "77"))),
    "parity": Family(_parity, _parity_space,
                     re.compile(r"Name an (even|odd) number between (\d+) and (\d+)\."),
                     lambda g: (g[0], int(g[1]), int(g[2])),
                     (("Name an even number between 101 and 105.", "104"),
                      ("Name an odd number between 60 and 64.", "61"))),
    "spelling": Family(_spelling, lambda: [(w,) for w in SPELLING_WORDS],
                       re.compile(r'Name a letter in the word "([A-Z]+)"\.'), tuple,
                       (('Name a letter in the word "FOX".', "O"),
                        ('Name a letter in the word "JUMP".', "J"))),
    "words": Family(_words, lambda: [(text,) for text in WORD_QUESTIONS],
                    re.compile("|".join(f"({re.escape(t)})" for t in WORD_QUESTIONS)),
                    lambda groups: tuple(g for g in groups if g), ()),
}
NUMERIC = ("range", "primes", "multiples", "parity")


def worked_examples(question: Question) -> tuple[tuple[str, str], ...]:
    """The (question, answer) pairs shown before `question`: its family's, or for the words
    family its group's (same candidates, one right answer each)."""
    if question.family == "words":
        return WORD_GROUPS[WORD_QUESTIONS[question.text][0]][1]
    return FAMILIES[question.family].examples


# ---------------------------------------------------------------- prompts and splits

def build(family: str, params: tuple) -> Question:
    """The question of `family` with `params`."""
    return FAMILIES[family].build(*params)


def split_of(family: str, params: tuple) -> str:
    """`train` or `test`, from a stable hash (crc32) of the family and parameters, never a seed."""
    key = ":".join([family, *map(str, params)])
    return "test" if zlib.crc32(key.encode()) % TEST_SHARE == 0 else "train"


@functools.lru_cache(maxsize=None)
def questions(family: str, split: str) -> tuple[Question, ...]:
    """Every question of `family` in `split`, in a fixed order."""
    return tuple(build(family, p) for p in FAMILIES[family].space() if split_of(family, p) == split)


def conversation(question: Question, shots: int | None = None) -> list[dict[str, str]]:
    """System message, `shots` worked examples for the question, then the question."""
    messages = [{"role": "system", "content": SYSTEM}]
    for text, answer in worked_examples(question)[:SHOTS if shots is None else shots]:
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content": question.text}]


def _families(families: tuple[str, ...] | None) -> tuple[str, ...]:
    families = tuple(families or FAMILIES)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise UserError(f"unknown question family '{unknown[0]}' (known: {', '.join(FAMILIES)})")
    return families


def make_questions(split: str, n: int, seed: int,
                   families: tuple[str, ...] | None = None) -> list[Question]:
    """n questions from `split`: families in turn, each family's questions in a seeded random
    order (reshuffled when they run out, so a small family repeats its questions)."""
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}' (known: {', '.join(SPLITS)})")
    if n < 0:
        raise UserError(f"number of prompts must be >= 0, got {n}")
    families = _families(families)
    rng = random.Random(f"choices:{split}:{seed}")
    pools: dict[str, list[Question]] = {f: [] for f in families}
    out = []
    for i in range(n):
        family = families[i % len(families)]
        if not pools[family]:
            pools[family] = list(questions(family, split))
            rng.shuffle(pools[family])
        out.append(pools[family].pop())
    return out


def make_prompts(split: str, n: int, seed: int = 0,
                 families: tuple[str, ...] | None = None) -> list[list[dict[str, str]]]:
    """n chat prompts (lists of {role, content}) from `split`, deterministic for a seed."""
    return [conversation(q) for q in make_questions(split, n, seed, families)]


def candidate_rows(split: str, n: int, seed: int = 0,
                   families: tuple[str, ...] | None = None) -> list[dict]:
    """n rows `{prompt, candidates, rewards}` (the input of `softpo.candidates`): each prompt of
    `make_prompts` with all its candidates and their rewards under `reward`."""
    rows = []
    for prompt in make_prompts(split, n, seed, families):
        cands = candidates(prompt)
        rows.append({"prompt": prompt, "candidates": cands,
                     "rewards": [reward(prompt, c) for c in cands]})
    return rows


# ---------------------------------------------------------------- reading a prompt

def question_text(prompt: str | list[dict[str, str]]) -> str:
    """The question asked: the last user message of a conversation, or the string itself."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt
             if isinstance(m, dict) and m.get("role") == "user"]
    return users[-1] if users else ""


def question_for(prompt: str | list[dict[str, str]]) -> Question:
    """The (last) question in a prompt, rebuilt from its text; UserError if there is none."""
    text = question_text(prompt)
    for name, family in FAMILIES.items():
        found = list(family.pattern.finditer(text))
        if found:
            q = build(name, family.parse(found[-1].groups()))
            if q.candidates:
                return q
    raise UserError(f"not a choices task prompt (no known question in {text[-60:]!r})")


def candidates(prompt: str | list[dict[str, str]]) -> list[str]:
    """Every canonical answer to the prompt's question, right and wrong, without duplicates."""
    return list(question_for(prompt).candidates)


def correct(prompt: str | list[dict[str, str]]) -> set[str]:
    """The correct canonical answers to the prompt's question."""
    return set(question_for(prompt).correct)


# ---------------------------------------------------------------- reward

INTEGER = re.compile(r"-?\d+")
WORD = re.compile(r"[A-Za-z]+")


def _first_candidate(question: Question, text: str) -> str | None:
    """The first candidate token of a response, in canonical form (None if it has none)."""
    if question.numeric:
        found = INTEGER.search(text)
        return str(int(found.group())) if found else None
    by_lower = {c.lower(): c for c in question.candidates}
    one_letter = question.candidates == LETTERS
    for word in WORD.findall(text):
        if (len(word) == 1 or not one_letter) and word.lower() in by_lower:
            return by_lower[word.lower()]
    return None


def score(question: Question, response: str) -> float:
    """The reward of `response` to `question` (table in the module docstring)."""
    text = response.strip()
    bare = text[:-1] if text.endswith(".") else text
    if question.numeric:
        if re.fullmatch(r"-?\d+", bare):
            return 1.0 if str(int(bare)) in question.correct else 0.0
    elif bare.lower() in {c.lower() for c in question.correct}:
        return 1.0
    first = _first_candidate(question, text)
    if first is None or first not in question.correct:
        return 0.0
    extra = max(0, len(text) - len(first))
    return 0.5 - 0.25 * min(1.0, extra / WORDY_SPAN)


def reward(prompt: str | list[dict[str, str]], response: str) -> float:
    """Expert reward for `softpo build-prefs --expert softpo.tasks.choices:reward`."""
    return score(question_for(prompt), response)
