"""Published numbers: every table in README.md and docs/ is the rendering of a stored run
(`docs/results/*.json`, written by `scripts/results.py`), and fresh runs match the stored ones
within the stated tolerances (the long reruns are marked slow)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _results_module():
    spec = importlib.util.spec_from_file_location("softpo_results", ROOT / "scripts" / "results.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


results = _results_module()


def test_documents_are_the_rendering_of_the_stored_runs():
    stale = results.render(check=True)
    assert not stale, f"re-render with `python scripts/results.py --render`: {stale}"


def test_every_block_names_a_known_renderer_and_a_stored_run():
    known = results.renderers()
    seen = set()
    for path in results.DOCUMENTS:
        for m in results.BLOCK.finditer(path.read_text()):
            name = m.group("name")
            assert name in known, f"{path.name}: unknown block {name}"
            assert results.load(known[name][0]) is not None, f"{path.name}: {name} never measured"
            seen.add(name)
    assert {"lab-seeds", "lab-table", "lab-tabular"} <= seen


@pytest.mark.parametrize("path", sorted((ROOT / "docs" / "results").glob("*.json")),
                         ids=lambda p: p.stem)
def test_stored_runs_say_how_they_were_made(path):
    res = json.loads(path.read_text())
    assert res["target"] == path.stem and res["target"] in results.TARGETS
    assert res["commands"] and all(isinstance(c, str) for c in res["commands"])
    assert res["commit"] and res["date"] and res["machine"]["cpu"]


def _git(*args: str) -> str:
    import subprocess

    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_stale_names_the_code_changed_since_a_measurement(monkeypatch):
    first = _git("rev-list", "--max-parents=0", "HEAD").split()[0][:7]  # the code then: nothing
    head = _git("rev-parse", "--short", "HEAD")
    changed_now = _git("status", "--porcelain", "--", *results.CODE, "scripts/lab_rounding.py")
    stored = {"lab-rounding": {"commit": first}, "lab-seeds": {"commit": head},
              "train-tiny": {"commit": "0000000"},
              "lab-table": {"commit": head, "points": [{"commit": head}, {"commit": first}]}}
    monkeypatch.setattr(results, "load", stored.get)
    assert any("files changed since" in w for w in results.stale("lab-rounding"))
    assert (results.stale("lab-seeds") == []) == (not changed_now)
    assert results.stale("train-tiny") == ["0000000: not a commit of this repository"]
    assert [w.split(":")[0] for w in results.stale("lab-table")] == \
        sorted([first] + ([head] if changed_now else []))
    assert results.stale("lab-drift") == []  # never measured: publishes nothing


def test_jobs_run_one_thread_targets_side_by_side_and_the_rest_alone(tmp_path, monkeypatch):
    import threading
    import time

    running, seen = set(), []
    guard = threading.Lock()

    def fake(name):
        def measure(out):
            with guard:
                running.add(name)
                seen.append((name, frozenset(running)))
            time.sleep(0.2)
            with guard:
                running.discard(name)
            return {"commands": [name], "runs": []}
        return measure

    targets = {n: results.Target(n, n, 1, fake(n), one_thread=n.startswith("lab"))
               for n in ("lab-a", "lab-b", "bench-c")}
    monkeypatch.setattr(results, "TARGETS", targets)
    monkeypatch.setattr(results, "RESULTS", tmp_path)
    monkeypatch.setattr(results, "render", lambda: [])
    monkeypatch.setattr(results, "machine", lambda: {"cpu": "test"})
    results.run_targets(["bench-c", "lab-a", "lab-b"], jobs=2)
    together = dict(seen)
    assert together["bench-c"] == {"bench-c"}  # alone, after the one-thread targets
    assert {"lab-a", "lab-b"} in (together["lab-a"], together["lab-b"])
    assert sorted(p.stem for p in tmp_path.glob("*.json")) == ["bench-c", "lab-a", "lab-b"]


def test_rendering_puts_the_numbers_between_the_markers(tmp_path, monkeypatch):
    stored = {"runs": [{"alpha": 0.5, "seed": s, "kl_to_target": 0.001 * (s + 1)}
                       for s in range(5)]}
    monkeypatch.setattr(results, "load", lambda name: stored if name == "lab-seeds" else None)
    text = "intro\n<!-- results:lab-seeds-short -->\nold\n<!-- /results:lab-seeds-short -->\nend\n"
    out = results.rendered(text, {})
    assert "old" not in out and "| 0.5 | 5 | 0.003 | 0.005 |" in out
    assert out.startswith("intro\n<!-- results:lab-seeds-short -->\n") and out.endswith("end\n")


def test_publishing_the_demo_report_keeps_the_frontier_report_beside_it(tmp_path):
    run, docs = tmp_path / "run", tmp_path / "docs"
    run.mkdir()
    (docs / "frontier").mkdir(parents=True)
    for f in (run / "results.md", run / "frontier.png", run / "results.json",
              docs / "old.png", docs / "frontier" / "results.md"):
        f.write_text(f.name)
    results.publish_report(run, docs)
    assert sorted(p.name for p in docs.iterdir()) == ["frontier", "frontier.png", "results.md"]
    assert (docs / "frontier" / "results.md").exists()


def test_a_small_pinned_subset_matches_a_fresh_run():
    """The tabular lab's seed-0 SPO row at alpha 1, rerun (seconds), against the stored one."""
    from softpo.lab.tabular import LabConfig, public, run

    stored = results.load("lab-tabular")
    row = next(r for r in stored["runs"] if r["seed"] == 0 and r["loss"] == "spo"
               and r["alpha"] == 1.0)
    fresh = public(run(LabConfig(loss="spo", alpha=1.0, seed=0)))
    assert fresh["kl_to_target"] == pytest.approx(row["kl_to_target"], rel=0.25, abs=1e-4)
    assert fresh["entropy"] == pytest.approx(row["entropy"], abs=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lab-tabular", "lab-table", "lab-seeds", "lab-growth",
                                  "lab-growth-large", "lab-drift", "train-tiny", "demo"])
def test_a_fresh_run_matches_the_stored_numbers(name):
    assert results.main(["--compare", name]) == 0


def _stored_point(name: str, commit: str, **kw) -> dict:
    return {"expert": "plain", "seed": 0, "point": name, "commit": commit, "reward": 0.5,
            **results.point_table()[name], **kw}


def test_a_rerun_of_the_experts_keeps_only_the_points_that_are_current(tmp_path):
    first = _git("rev-list", "--max-parents=0", "HEAD").split()[0][:7]  # the code then: nothing
    head = _git("rev-parse", "--short", "HEAD")
    unchanged = not _git("status", "--porcelain", "--", *results.CODE, "examples") and \
        results.study_runner(_git("show", f"HEAD:{results.EXPERT_STUDY}")) == \
        results.study_runner((ROOT / results.EXPERT_STUDY).read_text())
    point = _stored_point("spo-a1", head)
    stored = {"points": [point, {**point, "seed": 1, "commit": first},
                         {**point, "seed": 2, "lr": 0.5},  # the table defines it differently
                         {**point, "expert": "concise", "commit": head + "+changes"}]}
    log = tmp_path / "plain" / "points.jsonl"
    assert results.keep_current_points(stored, tmp_path) == int(unchanged)
    assert results.keep_current_points(stored, tmp_path) == int(unchanged)  # not twice
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    assert rows == ([point] if unchanged else [])
    assert not (tmp_path / "concise").exists()


def test_an_expert_point_is_stale_on_its_own(monkeypatch):
    head = _git("rev-parse", "--short", "HEAD")
    points = [_stored_point("dpo", head), _stored_point("dpo", head, beta=0.2),
              _stored_point("dpo", head, point="dpo-retired")]
    monkeypatch.setattr(results, "changed_since", lambda sha, paths: None)  # the library as then
    monkeypatch.setattr(results, "study_runner", lambda source: "the same runner")
    ok, redefined, gone = results.expert_point_staleness(points)
    assert ok is None
    assert redefined == "dpo: defined differently now (beta 0.2 -> 0.1)"
    assert gone == f"dpo-retired: no longer defined in {results.EXPERT_STUDY}"
    calls = iter(range(9))  # every runner differs from every other
    monkeypatch.setattr(results, "study_runner", lambda source: next(calls))
    assert results.expert_point_staleness(points[:1]) == [
        f"{head}: {results.EXPERT_STUDY} (all but its point table) changed since"]


def test_the_study_runner_ignores_the_point_table_and_nothing_else():
    source = (ROOT / results.EXPERT_STUDY).read_text()
    table = "    return {p.name: p for p in out}"
    assert table in source
    more_points = source.replace(table, '    out.append(Point("x", alpha=9.0))\n' + table)
    assert results.study_runner(more_points) == results.study_runner(source)
    assert results.study_runner(source + "\n# a comment\n") == results.study_runner(source)
    runner_line = "max_new_tokens=32, seed=seed"
    assert runner_line in source
    changed = source.replace(runner_line, "max_new_tokens=33, seed=seed")
    assert results.study_runner(changed) != results.study_runner(source)


def test_collect_puts_the_points_a_stopped_run_finished_in_place_of_the_stored_ones(
        tmp_path, monkeypatch):
    def point(seed, name, commit, reward):
        return {"expert": "plain", "seed": seed, "point": name, "commit": commit, "reward": reward}

    stored = {"target": "experts", "commit": "aaa", "minutes": 9.0,
              "points": [point(0, "spo-a1", "aaa", 0.1), point(1, "spo-a1", "aaa", 0.2),
                         point(0, "reference", "aaa", 0.0)]}
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "points.jsonl").write_text(
        "".join(json.dumps(p) + "\n" for p in (point(1, "spo-a1", "bbb", 0.3),
                                                point(2, "spo-a1", "bbb", 0.4),
                                                point(0, "dpo", "bbb", 0.5))))
    monkeypatch.setattr(results, "EXPERTS_WORK", tmp_path)
    monkeypatch.setattr(results, "load", lambda name: stored)
    monkeypatch.setattr(results, "machine", lambda: {"cpu": "test"})
    res = results.collect_experts()
    assert [(p["point"], p["seed"], p["reward"]) for p in res["points"]] == [
        ("reference", 0, 0.0), ("spo-a1", 0, 0.1), ("spo-a1", 1, 0.3), ("spo-a1", 2, 0.4),
        ("dpo", 0, 0.5)]
    assert res["commit"] == "bbb" and res["minutes"] == 9.0  # the points' most common commit
    assert res["commands"][0].startswith("OMP_NUM_THREADS=1 python scripts/expert_study.py")


def test_only_stale_runs_the_targets_stale_lists_and_nothing_else(monkeypatch):
    ran = []
    monkeypatch.setattr(results, "stale", lambda n: ["abc: 1 files changed since (x)"]
                        if n in ("demo", "online") else [])
    monkeypatch.setattr(results, "run_targets", lambda names, jobs: ran.append((names, jobs)))
    assert results.main(["--only-stale", "--jobs", "2", "demo", "lab-seeds", "online"]) == 0
    assert ran == [(["demo", "online"], 2)]
