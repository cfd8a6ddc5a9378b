"""The saturation diagnostic: preference examples that the policy already explains give SPO's
pairwise term no gradient. Constructed on a tiny byte-level model: chosen answers of 2 characters
against rejected ones of 40 (at initialisation every byte costs about log(vocab) = 5.6 nats, so the
chosen side is ~200 nats more likely and sigmoid(alpha * margin) = 1 at alpha = 1), against healthy
pairs of equal length (margin ~0, probability ~0.5)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from softpo import cli
from softpo.config import load_config
from softpo.losses import SATURATED, ListLogps, LossParams, get_loss
from softpo.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.tiny.n_layer=1", "model.tiny.n_embd=32", "model.tiny.n_head=2",
        "data.max_length=96", "data.max_prompt_length=32", "data.eval_fraction=0",
        "train.batch_size=8", "train.progress=false", "train.report_to=[jsonl]",
        "train.save_steps=0", "train.eval_steps=0", "loss.beta=0", "optim.warmup_steps=0"]


def write_pairs(path: Path, saturated: bool, n: int = 48, seed: int = 0) -> Path:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    rows = []
    for i in range(n):
        word = "".join(rng.choice(letters) for _ in range(6))
        short = "ok"
        long_ = " ".join("".join(rng.choice(letters) for _ in range(4)) for _ in range(8))
        chosen, rejected = (short, long_) if saturated else (word[:3], word[3:])
        rows.append({"prompt": f"Q{i}: say {word}?", "chosen": chosen, "rejected": rejected})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_saturated_stat_by_hand():
    """pref_prob = sigmoid(alpha * margin): margins 10 and 0.5 at alpha 1 give 0.99995 (> 0.99:
    saturated) and 0.622 (not)."""
    lp = ListLogps(torch.tensor([[-1.0, -11.0], [-2.0, -2.5]]), torch.ones(2, 2))
    stats = get_loss("spo").fn(lp, LossParams(alpha=1.0)).stats
    assert stats["pref_saturated"].tolist() == [1.0, 0.0]
    assert SATURATED == 0.99


@pytest.mark.parametrize("saturated", [True, False])
def test_warning_prints_on_saturated_data_only(tmp_path, capsys, saturated):
    data = write_pairs(tmp_path / "pairs.jsonl", saturated)
    rc = cli.main(["train", str(ROOT / "configs" / "tiny.yaml"), *TINY, f"data.train={data}",
                   "train.max_steps=1", f"train.output_dir={tmp_path / 'run'}"])
    assert rc == 0
    out = capsys.readouterr().out
    assert ("already explained by the model" in out) == saturated
    start = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["step"] == 0
    assert (start["start/pref_saturated"] > 0.9) if saturated else (start["start/pref_saturated"] < 0.1)
    if saturated:
        assert "loss.alpha=" in out and start["start/margin"] > 50


def _trained_margin(tmp_path: Path, data: Path, alpha: float) -> tuple[float, float]:
    """(mean log-prob margin chosen - rejected before, after) 30 SPO steps at `alpha`."""
    cfg = load_config(ROOT / "configs" / "tiny.yaml",
                      [*TINY, f"data.train={data}", "train.max_steps=30", "optim.lr=3e-3",
                       f"loss.alpha={alpha}", f"train.output_dir={tmp_path / f'a{alpha}'}",
                       "train.saturation_check=48"])
    trainer = Trainer(cfg)
    before = trainer.saturation()
    trainer.train()
    return before["margin"], trainer.saturation()["margin"]


def test_alpha_one_learns_nothing_from_saturated_pairs_and_a_small_alpha_does(tmp_path):
    """At alpha = 1 the pairs' margin (~200 nats) makes 1 - sigmoid(alpha * margin) ~ 1e-87: 30
    steps move the margin by less than 1 nat. At alpha = 1 / margin (the warning's suggestion)
    the same steps widen it by more than 20 nats: the preference term has its gradient back."""
    data = write_pairs(tmp_path / "pairs.jsonl", saturated=True)
    start, after_one = _trained_margin(tmp_path, data, 1.0)
    assert start > 100
    assert abs(after_one - start) < 1.0
    _, after_small = _trained_margin(tmp_path, data, round(1 / start, 4))
    assert after_small - start > 20
