"""The demo pipeline end to end on the tiny local model (the real-model run is `make demo`)."""

import json

import pytest
import torch

from softpo import cli
from softpo.tasks import arithmetic


def test_demo_pipeline_on_tiny_model(tmp_path, monkeypatch, capsys):
    # A random tiny model never answers arithmetic, so every reward ties; a length-based expert
    # gives the pipeline real preferences to learn from.
    monkeypatch.setattr(arithmetic, "reward", lambda prompt, response: -float(len(response)))
    out = tmp_path / "demo"
    code = cli.main(["demo", "--model", "tiny", "--out", str(out), "--train-prompts", "6",
                     "--eval-prompts", "2", "--steps", "2", "--batch-size", "2",
                     "--max-new-tokens", "6", "--eval-samples", "2", "--no-progress",
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


@pytest.mark.slow
def test_real_model_converts_and_takes_a_training_step(tmp_path):
    """The embedded SmolLM2-135M-Instruct: GGUF conversion (cached) and one LoRA SPO step with the
    global regulariser on the real model."""
    from softpo.config import load_config
    from softpo.models import fetch_default
    from softpo.trainer import Trainer

    path = fetch_default(progress=False)
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps({"prompt": [{"role": "user", "content": "Which is larger, 3 or 7?"}],
                                 "chosen": "7", "rejected": "3"}) + "\n")
    cfg = load_config(None, [f"model.name_or_path={path}", "lora.enabled=true",
                             f"data.train={prefs}", "data.eval_fraction=0", "train.max_steps=1",
                             "train.batch_size=1", f"train.output_dir={tmp_path / 'run'}",
                             "train.save_steps=0", "train.eval_steps=0", "train.progress=false",
                             "regularizer.prompts_per_step=1", "regularizer.max_new_tokens=4"])
    trainer = Trainer(cfg)
    before = {n: p.clone() for n, p in trainer.policy.named_parameters() if p.requires_grad}
    metrics = trainer.train()
    after = dict(trainer.policy.named_parameters())
    assert metrics["kl"] == metrics["kl"] and metrics["grad_norm"] > 0
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()
