"""A large preference file of realistic lengths, deterministic by seed:
`python -m bench.big_prefs --rows 200000 --out big.jsonl [--chat] [--seed 0]`.

Texts are English-like: sentences of 4..24 words drawn from a fixed list of common words with
Zipf-like frequencies, capitalised, punctuated, now and then a number, grouped into paragraphs.
A prompt has a target length of 20..400 words, each response 15..350 words, both log-uniform
(with a BPE tokenizer such as SmolLM2's, about 1.15 tokens per word: prompts of tens to a few
hundred tokens, about a fifth of them longer than the default `max_prompt_length` of 256), so
short and long rows mix as in real data. The chosen and rejected responses are independent draws.

`--chat` writes the conversational form: `prompt` a list of messages (a system message in a
quarter of the rows, a previous user/assistant exchange in a fifth), `chosen` and `rejected` one
assistant message each. The same seed gives the same file, byte for byte. numpy draws the words
of 10,000 rows at a time, so a large file is quick to write.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

WORDS = """the of and to in is was that for it as with be on not he by are this at from his but
have an they which one you were all we her she there would their will when who him been has more
if no out so what up said about other into than its time only could new them man some these then
two first may any like now my such make over our even most me state after also made many did must
before back see through way where get much go well your know should down work year because come
people just say each those take day good how long little use own great old under last same right
show think world small large water house point home hand high place part life while case fact
group number question public during without again often against never system program service
area problem information company under local social early important example government data
model answer result reason answer light order level money music power market story study health
change family child student history figure table report process language method value general
simple common clear different possible better best short free open full true real sure whole
kind form line side city body research game book word food member class test voice plan effect
policy energy price risk rule design paper paper river street morning evening summer winter""".split()
FUNCTION = """the of and to a in that is for it with as on at by from this be are was""".split()
PROMPT_WORDS, RESPONSE_WORDS = (20, 400), (15, 350)  # inclusive, log-uniform


def _lengths(rng: np.random.Generator, lo_hi: tuple[int, int], n: int) -> np.ndarray:
    lo, hi = np.log(lo_hi[0]), np.log(lo_hi[1] + 1)
    return np.exp(rng.uniform(lo, hi, n)).astype(np.int64)  # (n,)


class Writer:
    """Seeded English-like text: `texts(lengths)` -> one string of about each length in words."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        vocab = list(dict.fromkeys(FUNCTION + WORDS))  # function words first: the most frequent
        ranks = np.arange(1, len(vocab) + 1)
        self.vocab = np.array(vocab, dtype=object)
        self.p = (1.0 / ranks) / (1.0 / ranks).sum()  # Zipf, s = 1

    def texts(self, lengths: np.ndarray) -> list[str]:
        """One text per length (words): sentences of 4..24 words, paragraphs of 2..6 sentences."""
        words = self.vocab[self.rng.choice(len(self.vocab), size=int(lengths.sum()), p=self.p)]
        numbers = self.rng.random(len(words)) < 0.01
        words[numbers] = [str(x) for x in self.rng.integers(2, 2000, int(numbers.sum()))]
        sentence = self.rng.integers(4, 25, len(words) // 4 + len(lengths) + 1)
        marks = self.rng.choice([".", ".", ".", "?", "!", ",", ";"], size=len(sentence))
        breaks = self.rng.random(len(sentence)) < 0.25
        out, start, s = [], 0, 0
        for n in lengths.tolist():
            parts, left = [], n
            while left > 0:
                k = min(left, int(sentence[s]))
                chunk = words[start:start + k].tolist()
                start, left = start + k, left - k
                if not parts or parts[-1][-2] in ".?!" or parts[-1][-1] == "\n":
                    chunk[0] = chunk[0].capitalize()
                end = "." if left == 0 else str(marks[s])
                parts.append(" ".join(chunk) + end + ("\n\n" if breaks[s] and left else " "))
                s = (s + 1) % len(sentence)
            out.append("".join(parts).rstrip())
        return out


def _chat(rng: np.random.Generator, w: Writer, prompts: list[str], chosen: list[str],
          rejected: list[str]) -> list[dict]:
    system, history = rng.random(len(prompts)) < 0.25, rng.random(len(prompts)) < 0.2
    extra = w.texts(_lengths(rng, (8, 40), int(system.sum() + 2 * history.sum())))
    rows, k = [], 0
    for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected)):
        msgs = []
        if system[i]:
            msgs.append({"role": "system", "content": extra[k]})
            k += 1
        if history[i]:
            msgs += [{"role": "user", "content": extra[k]},
                     {"role": "assistant", "content": extra[k + 1]}]
            k += 2
        msgs.append({"role": "user", "content": p})
        rows.append({"prompt": msgs, "chosen": [{"role": "assistant", "content": c}],
                     "rejected": [{"role": "assistant", "content": r}]})
    return rows


def rows(n: int, seed: int = 0, chat: bool = False, block: int = 10_000):
    """Yield `n` preference rows (dicts), in blocks of `block` drawn together."""
    rng = np.random.default_rng([seed, 1])
    w = Writer(seed)
    for start in range(0, n, block):
        m = min(block, n - start)
        prompts = w.texts(_lengths(rng, PROMPT_WORDS, m))
        chosen = w.texts(_lengths(rng, RESPONSE_WORDS, m))
        rejected = w.texts(_lengths(rng, RESPONSE_WORDS, m))
        if chat:
            yield from _chat(rng, w, prompts, chosen, rejected)
        else:
            for p, c, r in zip(prompts, chosen, rejected):
                yield {"prompt": p, "chosen": c, "rejected": r}


def write(path: Path, n: int, seed: int = 0, chat: bool = False) -> Path:
    """Write `n` rows as JSONL to `path` (through a temporary file, renamed when complete)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows(n, seed, chat):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.big_prefs", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="conversational rows (lists of messages)")
    args = p.parse_args(argv)
    path = write(args.out, args.rows, args.seed, args.chat)
    print(f"wrote {args.rows} {'conversational ' if args.chat else ''}rows to {path} "
          f"({path.stat().st_size / 2 ** 20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
