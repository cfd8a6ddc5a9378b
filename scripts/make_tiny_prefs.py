"""Writes examples/data/prefs_tiny.jsonl: the small preference set `configs/tiny.yaml` trains on.

A toy "helpful tone" preference: for a question about a thing, the chosen answer is kind and
specific, the rejected one dismissive. A tiny byte-level model learns it in a minute on a CPU, and
held-out rows use things and word combinations never seen in training.
"""

import json
import random
from pathlib import Path

THINGS = ["soup", "movie", "trip", "book", "game", "song", "class", "park", "bus", "cake", "tea",
          "film", "show", "walk", "lamp", "chair", "phone", "shoe", "coat", "bike", "train", "map",
          "pen", "desk", "room", "hotel", "beach", "city", "farm", "lake", "river", "road", "shop"]
GOOD = ["warm", "lovely", "great", "kind", "bright", "calm", "clean", "fresh", "sweet", "clear"]
BAD = ["awful", "dull", "boring", "bad", "cold", "dirty", "stale", "ugly", "rude", "noisy"]


def row(rng: random.Random, thing: str) -> dict:
    g1, g2 = rng.sample(GOOD, 2)
    b1, b2 = rng.sample(BAD, 2)
    return {"prompt": f"How was the {thing}?", "chosen": f" The {thing} was {g1} and {g2}.",
            "rejected": f" The {thing} was {b1} and {b2}."}


def main() -> None:
    rng = random.Random(0)
    rows = [row(rng, rng.choice(THINGS)) for _ in range(400)]
    out = Path(__file__).resolve().parent.parent / "examples" / "data" / "prefs_tiny.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
