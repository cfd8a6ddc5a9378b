"""softpo/export.py and `softpo export`: a tiny LoRA run exported merged and as an adapter, and a
full model copied, each loaded with `AutoModelForCausalLM.from_pretrained` alone and giving the
trained model's logits; the model card names the method, the data and the run's metrics; bad
sources are one line, exit code 2, and leave no folder behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from softpo import cli, export
from softpo.config import load_config
from softpo.tracking import read_metrics
from softpo.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "prefs_tiny.jsonl"
TEXTS = ["What is 2 + 2?", "The quick brown fox"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A 3-step tiny LoRA run, and the trained policy's logits on TEXTS."""
    out = tmp_path_factory.mktemp("lora") / "run"
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"data.train={DATA}", "data.max_length=64", "data.max_prompt_length=32",
        "model.tiny.n_layer=1", "model.tiny.n_embd=32", "model.tiny.n_head=2",
        f"train.output_dir={out}", "train.max_steps=3", "train.batch_size=4",
        "train.logging_steps=1", "train.eval_steps=0", "train.save_steps=0",
        "train.progress=false", "train.report_to=[jsonl]", "regularizer.prompts_per_step=2",
        "regularizer.max_new_tokens=8", "lora.enabled=true", "lora.r=4", "optim.lr=0.05"])
    trainer = Trainer(cfg)
    trainer.train()
    return out, logits(trainer.model.eval(), trainer.tokenizer)


@torch.no_grad()
def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True).to(model.device)
    return model(**batch).logits.cpu()  # (2, T, V)


def load_plain(folder: Path):
    """The exported folder as transformers alone loads it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def test_merged_lora_export_is_a_plain_model_with_the_trained_logits(lora_run, tmp_path, capsys):
    run, trained = lora_run
    out = tmp_path / "merged"
    assert cli.main(["export", str(run), str(out), "--merge"]) == 0
    assert "exported to" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    model, tokenizer = load_plain(out)
    assert not hasattr(model, "peft_config")  # LoRA is in the weights, not beside them
    torch.testing.assert_close(logits(model, tokenizer), trained, atol=1e-5, rtol=1e-5)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(run / "final" / "base").eval()
    assert not torch.allclose(logits(base, tokenizer), trained, atol=1e-3)  # training changed it

    card = (out / "README.md").read_text()
    last = {k: v for row in read_metrics(run / "metrics.jsonl") for k, v in row.items()}
    assert "library_name: transformers" in card and "`spo` (alpha=1.0, beta=0.05)" in card
    assert f"`{DATA}`" in card and "for 3 steps" in card and "merged into the weights" in card
    assert f"| rewards/accuracies | {last['rewards/accuracies']:.4g} |" in card
    assert f"| eval_pref_loss | {last['eval_pref_loss']:.4g} |" in card
    assert (out / "config.yaml").read_text() == (run / "final" / "config.yaml").read_text()


def test_adapter_export_names_its_base_and_loads_with_transformers(lora_run, tmp_path):
    """Without --merge: the adapter, and the tiny base (not loadable by name) copied to base/ and
    named by its path; transformers loads base then adapter, with the trained logits."""
    run, trained = lora_run
    out = tmp_path / "adapter"
    assert cli.main(["export", str(run / "final"), str(out)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((out / "base").resolve())
    model, tokenizer = load_plain(out)
    assert hasattr(model, "peft_config")
    torch.testing.assert_close(logits(model, tokenizer), trained, atol=1e-5, rtol=1e-5)
    assert "library_name: peft" in (out / "README.md").read_text()


def test_a_full_model_is_copied(tmp_path):
    from softpo.config import TinyModelConfig
    from softpo.models import build_tiny_model, byte_tokenizer, save_pretrained_atomic

    tok = byte_tokenizer()
    model = build_tiny_model(TinyModelConfig(n_layer=1, n_embd=32, n_head=2,
                                             architecture="gpt2"), tok, seed=4).eval()
    save_pretrained_atomic(model, tok, tmp_path / "model")
    assert cli.main(["export", str(tmp_path / "model"), str(tmp_path / "out"), "--merge"]) == 0
    loaded, tokenizer = load_plain(tmp_path / "out")
    torch.testing.assert_close(logits(loaded, tokenizer), logits(model, tok), atol=1e-5, rtol=1e-5)
    assert "the full model, copied" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize("case, message", [
    ("not_a_model", "not a model folder or a run directory"),
    ("unfinished_run", "this run has no final/ model (did it finish?)"),
    ("missing", "not found"),
    ("out_exists", "already exists; export writes a new folder"),
])
def test_bad_sources_are_one_line_and_leave_nothing(case, message, tmp_path, capsys):
    source, out = tmp_path / "source", tmp_path / "out"
    if case != "missing":
        source.mkdir()
        (source / "notes.txt").write_text("hello")
    if case == "unfinished_run":
        (source / "config.yaml").write_text("loss: {name: spo}\n")
    if case == "out_exists":
        source = ROOT / "tests"  # not a model either: the output is checked first
        out.mkdir()
    code = cli.main(["export", str(source), str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        sorted(["out"] * (case == "out_exists") + ["source"] * (case != "missing"))


def test_a_failed_export_leaves_no_folder(lora_run, tmp_path, monkeypatch):
    """A crash while the weights are written: no OUT, no temporary folder."""
    run, _ = lora_run

    def crash(source, dest):
        (dest / "model.safetensors").write_bytes(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(export, "_write_merged", crash)
    with pytest.raises(OSError):
        export.export(str(run), tmp_path / "out", merge=True)
    assert list(tmp_path.iterdir()) == []
