"""The Python API (docs/python.md): `softpo.train` from a path or a `Config`, a model and datasets of
one's own, `Trainer.model`, a `Config` checked like a YAML file, and a user's loss registered with
`softpo.losses.register` and loaded by `loss.module` from the command line. The page's example is
executed here."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

import softpo
from softpo import cli
from softpo.losses import LOSSES
from softpo.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "prefs_tiny.jsonl"
TINY = ["model.tiny.n_layer=1", "model.tiny.n_embd=32", "model.tiny.n_head=2",
        "data.max_length=64", "data.max_prompt_length=32", "train.batch_size=4",
        "train.progress=false", "train.report_to=[jsonl]", "regularizer.prompts_per_step=2",
        "regularizer.max_new_tokens=4", "optim.lr=1e-2"]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_docs_example_runs(tmp_path, monkeypatch, capsys):
    """docs/python.md's code, block by block in one namespace: the Dataset example, the Trainer,
    and the loss module (written to mypkg/losses.py, imported, trained with)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    blocks = python_blocks((ROOT / "docs" / "python.md").read_text())
    assert len(blocks) == 3
    namespace: dict = {}
    try:
        for block in blocks:
            if block.startswith("# mypkg/losses.py"):
                (tmp_path / "mypkg").mkdir()
                (tmp_path / "mypkg" / "__init__.py").write_text("")
                (tmp_path / "mypkg" / "losses.py").write_text(block)
            else:
                exec(compile(block, "docs/python.md", "exec"), namespace)
        metrics = namespace["metrics"]
        assert math.isfinite(metrics["loss"]) and metrics["nonfinite_steps"] == 0
        assert "held-out accuracy" in capsys.readouterr().out
        assert (tmp_path / "runs" / "python-example" / "final" / "model.safetensors").is_file()
        assert namespace["aligned"] is namespace["model"]  # trained in place, handed back
        rc = cli.main(["train", str(ROOT / "configs" / "tiny.yaml"), *TINY,
                       f"data.train={DATA}", "train.max_steps=2", "loss.module=mypkg.losses",
                       "loss.name=margin_spo", f"train.output_dir={tmp_path / 'run'}"])
        assert rc == 0 and "margin_spo" in LOSSES
        assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
                   if "loss" in r)
    finally:
        LOSSES.pop("margin_spo", None)
        for name in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
            del sys.modules[name]


def test_train_from_a_config_file_with_overrides(tmp_path):
    metrics = softpo.train(ROOT / "configs" / "tiny.yaml", *TINY, "train.max_steps=2",
                           f"train.output_dir={tmp_path / 'run'}")
    assert math.isfinite(metrics["loss"]) and "eval_pref_loss" in metrics
    assert (tmp_path / "run" / "final" / "config.yaml").is_file()


def test_trainer_model_is_the_trained_policy(tmp_path):
    cfg = softpo.load_config(ROOT / "configs" / "tiny.yaml", [*TINY, "train.max_steps=2",
                                                              f"train.output_dir={tmp_path}"])
    trainer = softpo.Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "final" / "model.safetensors"))
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(saved[k], after[k].cpu()) for k in saved)


def test_datasets_in_every_form_give_the_same_rows(tmp_path):
    """A path, a list of dicts and a `datasets.Dataset` of the same rows tokenise alike; a bad row
    given in memory is named by what it was passed as."""
    import datasets

    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:12]]
    cfg = softpo.load_config(ROOT / "configs" / "tiny.yaml",
                             [*TINY, f"train.output_dir={tmp_path}", "data.eval_fraction=0"])

    def tokens(source):
        t = softpo.Trainer(cfg, train_dataset=source)
        return [(e.prompt_ids, e.response_ids) for e in t.train_set]

    want = tokens(str(DATA))[:12]
    assert tokens(rows) == want == tokens(datasets.Dataset.from_list(rows))
    bad = rows[:3] + [{"prompt": "p", "chosen": "a"}]
    with pytest.raises(softpo.UserError, match=r"^train_dataset:4: field 'rejected': missing$"):
        softpo.Trainer(cfg, train_dataset=bad)
    with pytest.raises(softpo.UserError, match=r"^eval_dataset:1: field 'chosen': missing"):
        softpo.Trainer(cfg, train_dataset=rows, eval_dataset=[{"prompt": "p", "rejected": "b"}])


def test_a_python_config_is_checked_like_a_yaml_file(tmp_path):
    """The same one-line message, without a file to name: ranges, types, unknown keys, losses."""
    cases = [("loss", "alpha", -1, "alpha: -1", "config key 'loss.alpha': must be > 0, got -1.0"),
             ("loss", "alpha", "x", "alpha: x", "config key 'loss.alpha': expected float, got 'x'"),
             ("loss", "alhpa", 1.0, "alhpa: 1.0",
              "unknown config key 'loss.alhpa' (did you mean 'alpha'?)"),
             ("loss", "name", "nope", "name: nope", "config key 'loss.name': unknown loss 'nope'")]
    for section, key, value, yaml_line, message in cases:
        cfg = softpo.Config()
        setattr(getattr(cfg, section), key, value)
        with pytest.raises(softpo.UserError) as python_error:
            softpo.load_config(cfg)
        path = tmp_path / "bad.yaml"
        path.write_text(f"{section}:\n  {yaml_line}\n")
        with pytest.raises(softpo.UserError) as yaml_error:
            softpo.load_config(path)
        assert str(python_error.value).startswith(message)
        assert str(yaml_error.value) == f"{path}: {python_error.value}"
        with pytest.raises(softpo.UserError, match=re.escape(message)):
            softpo.train(cfg)
    cfg = softpo.Config()
    cfg.optim.adam_betas = (0.9, 0.99)
    assert softpo.load_config(cfg, ["loss.beta=0.2"]).optim.adam_betas == [0.9, 0.99]
    assert cfg.loss.beta == softpo.Config().loss.beta  # the caller's config is not modified


def test_a_model_of_ones_own_needs_its_tokenizer(tmp_path):
    from softpo.config import TinyModelConfig
    from softpo.models import build_tiny_model, byte_tokenizer

    model = build_tiny_model(TinyModelConfig(n_layer=1, n_embd=32, n_head=2), byte_tokenizer(), 0)
    cfg = softpo.load_config(ROOT / "configs" / "tiny.yaml", [*TINY, f"train.output_dir={tmp_path}"])
    with pytest.raises(softpo.UserError, match="needs its tokenizer"):
        softpo.Trainer(cfg, model=model)


def test_an_unknown_loss_module_is_one_line_exit_2(capsys, tmp_path, monkeypatch):
    rc = cli.main(["train", str(ROOT / "configs" / "tiny.yaml"), "loss.module=no_such_losses",
                   f"train.output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2 and err == ("softpo: error: command line: config key 'loss.module': cannot "
                               "import 'no_such_losses': module 'no_such_losses' not found\n")
    assert cli.main(["losses", "--module", "no_such_losses"]) == 2
    capsys.readouterr()
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    (tmp_path / "raising_losses.py").write_text("raise RuntimeError('boom')\n")
    try:
        assert cli.main(["losses", "--module", "raising_losses"]) == 2
    finally:
        sys.modules.pop("raising_losses", None)
    assert capsys.readouterr().err == ("softpo: error: --module: importing 'raising_losses' "
                                       "failed: RuntimeError: boom\n")


def test_register_checks_the_data_kind():
    with pytest.raises(ValueError, match="data_kind must be one of"):
        softpo.losses.register("x", data_kind="triples", needs_ref=False)
    assert "x" not in LOSSES
