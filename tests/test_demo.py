"""The demo pipeline end to end on the tiny local model (the real-model run is `make demo`)."""

import json

import pytest

from softpo import cli
from softpo.tasks import arithmetic


def test_demo_pipeline_on_tiny_model(tmp_path, monkeypatch, capsys):
    # A random tiny model never answers arithmetic, so every reward ties; a length-based expert
    # gives the pipeline real preferences to learn from.
    monkeypatch.setattr(arithmetic, "reward", lambda prompt, response: -float(len(response)))
    out = tmp_path / "demo"
    code = cli.main(["demo", "--model", "tiny", "--out", str(out), "--train-prompts", "8",
                     "--eval-prompts", "4", "--steps", "3", "--batch-size", "4",
                     "--max-new-tokens", "8", "--eval-samples", "2", "--no-progress",
                     "--alphas", "1", "0.5"])
    assert code == 0
    printed = capsys.readouterr().out
    for name in ("reference", "spo_alpha1", "spo_alpha0.5", "dpo"):
        assert f"| {name} |" in printed
    report = (out / "report.md").read_text()
    assert "training_curves.png" in report and (out / "entropy_vs_alpha.png").is_file()
    results = {r["name"]: r["metrics"] for r in json.loads((out / "results.json").read_text())}
    assert results["reference"]["kl"] == 0.0
    assert all(r["kl"] == r["kl"] for r in results.values())  # finite, not NaN
    rows = [json.loads(line) for line in (out / "prefs_train.jsonl").read_text().splitlines()]
    assert rows and all(len(r["chosen"]) <= len(r["rejected"]) for r in rows)


def test_demo_rejects_bad_settings(capsys):
    assert cli.main(["demo", "--alphas", "0"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
