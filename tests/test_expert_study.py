"""scripts/expert_study.py: every point of the study is a valid training config."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from softpo.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def _study():
    spec = importlib.util.spec_from_file_location("softpo_expert_study",
                                                  ROOT / "scripts" / "expert_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


study = _study()
TRAINED = [p for p in study.points().values() if p.loss != "none"]


@pytest.mark.parametrize("point", TRAINED, ids=lambda p: p.name)
def test_every_point_is_a_valid_config(point, tmp_path):
    prefs = "" if point.online_every else tmp_path / "prefs.jsonl"
    cfg = load_config(ROOT / "configs" / "smollm2_lora.yaml", study.train_overrides(
        point, "concise", 1, "base", prefs, tmp_path / "run", False))
    assert (cfg.loss.name, cfg.loss.alpha, cfg.optim.lr, cfg.train.seed) == \
        (point.loss, point.alpha, point.lr, 1)
    assert cfg.online.enabled == bool(point.online_every)


def test_online_points_label_like_the_offline_ones():
    point = study.points()["spo-a1-online-lr3e-4"]
    cfg = load_config(ROOT / "configs" / "smollm2_lora.yaml", study.train_overrides(
        point, "plain", 0, "base", "", Path("run"), False))
    assert cfg.data.train == "" and cfg.online.expert == study.EXPERTS["plain"]
    assert (cfg.online.every, cfg.online.responses, cfg.online.pairing, cfg.online.chat) == \
        (5, 4, "best-worst", True)
    assert cfg.online.prompts == str(study.TRAIN)
