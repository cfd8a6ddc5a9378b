"""The data-preparation benchmark (bench/data_prep.py) and its data (bench/big_prefs.py) run end to
end on tiny files: this measures nothing. The file generator is deterministic by seed; the summary's
ratios are checked on made-up runs. With TRL (every measure, both forms) the run is marked slow."""

from __future__ import annotations

import json

import pytest

from bench import big_prefs, data_prep
from softpo.config import DataConfig
from softpo.data import load_preferences


def test_big_prefs_is_deterministic_valid_and_long_enough(tmp_path):
    a, b, c = (big_prefs.write(tmp_path / f"{n}.jsonl", 300, seed=s, chat=chat)
               for n, s, chat in (("a", 3, False), ("b", 3, False), ("c", 3, True)))
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != big_prefs.write(tmp_path / "d.jsonl", 300, seed=4).read_bytes()
    plain, _ = load_preferences(str(a), DataConfig())
    chat, report = load_preferences(str(c), DataConfig())
    assert len(plain) == len(chat) == 300 and report.chat_rows == 300
    words = sorted(len(e.prompt.split()) for e in plain)
    assert words[0] >= 20 and words[-1] <= 400 and words[150] < 150  # log-uniform: short and long
    responses = sorted(len(r.split()) for e in plain for r in e.responses)
    assert responses[0] >= 15 and responses[-1] <= 350
    assert {m["role"] for e in chat for m in e.prompt} == {"system", "user", "assistant"}


def test_the_entry_point_runs_softpo_on_a_tiny_file(tmp_path):
    """One measured process (each costs an interpreter with torch and transformers)."""
    out = tmp_path / "out"
    assert data_prep.main(["--rows", "40", "--out", str(out), "--tokenizer", "tiny",
                           "--forms", "plain", "--repeats", "1", "--only", "softpo-cold"]) == 0
    (run,) = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert "error" not in run, run["error"]
    assert run["rows"] == 40 and 0 < run["kept"] <= 40 and run["tokens"] > 0
    assert run["peak_tree_pss_mb"] > 0
    assert "| softpo-cold | 40 |" in (out / "summary.md").read_text()


def test_the_workers_in_process(tmp_path, monkeypatch, _token_cache):
    """The softpo and data-check workers on conversational rows, without a subprocess."""
    from softpo import tokcache

    data = big_prefs.write(tmp_path / "chat.jsonl", 25, chat=True)
    tokenizer = data_prep.tokenizer_dir(tmp_path, "tiny")
    monkeypatch.setattr(tokcache, "default_dir", tokcache.default_dir)  # the worker replaces it
    common = ["--data", str(data), "--tokenizer", str(tokenizer), "--cache", str(tmp_path / "c"),
              "--max-length", "1024", "--max-prompt-length", "512", "--num-proc", "1"]
    results = {}
    for what in ("softpo", "softpo", "check"):
        assert data_prep.worker([what, *common, "--result", str(tmp_path / "r.json")]) == 0
        results.setdefault(what, []).append(json.loads((tmp_path / "r.json").read_text()))
    assert [r["rows"] for r in results["softpo"] + results["check"]] == [25, 25, 25]
    assert results["softpo"][0]["tokens"] == results["softpo"][1]["tokens"] > 0
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 1


def test_summary_ratios(tmp_path):
    runs = [("softpo-cold", 10.0, 900), ("trl-cold", 30.0, 1000), ("softpo-warm", 1.0, 700),
            ("trl-warm", 2.0, 1400)]
    lines = [json.dumps({"form": "plain", "measure": m, "round": 0, "rows": 100, "seconds": s,
                         "peak_tree_pss_mb": mb, "peak_rss_mb": mb, "load_average": 1.0})
             for m, s, mb in runs]
    (tmp_path / "runs.jsonl").write_text("\n".join(lines) + "\n")
    text = data_prep.write_summary(tmp_path)
    assert "| softpo-cold / trl-cold | 3.00x | 0.90x | >= 3x rows/s at <= 1x memory: met |" in text
    assert "| softpo-warm / trl-warm | 2.00x | 0.50x |" in text and "NOT met" in text


@pytest.mark.slow
def test_the_entry_point_runs_every_measure_with_trl(tmp_path):
    out = tmp_path / "out"
    assert data_prep.main(["--rows", "30", "--out", str(out), "--tokenizer", "tiny",
                           "--repeats", "1", "--num-proc", "1"]) == 0
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert len(runs) == 2 * len(data_prep.MEASURES)
    assert all("error" not in r and r["rows"] == 30 for r in runs), runs
    summary = (out / "summary.md").read_text()
    assert "softpo-cold / trl-cold" in summary and "### chat" in summary
