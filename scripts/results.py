"""Regenerate every number that README.md and docs/ publish.

    make results                            # every target that this machine can run (hours)
    python scripts/results.py lab-seeds     # one target
    python scripts/results.py --jobs 2      # the one-thread targets (the labs) two at a time
    python scripts/results.py --list        # the targets, what they run, roughly how long
    python scripts/results.py --render      # re-render the documents from docs/results/*.json
    python scripts/results.py --check       # exit 1 where a document differs from its rendering
    python scripts/results.py --compare lab-seeds   # rerun a target, compare with the committed one
    python scripts/results.py --stale       # which targets' code changed since they were measured
    python scripts/results.py --collect     # store the expert points a stopped run finished
    python scripts/results.py --only-stale --jobs 2   # rerun what --stale lists, nothing else

A target runs its commands (the exact command lines are kept with the results), stores what they
measured in `docs/results/<target>.json` together with the commit, the date, the machine and the
precision, and the tables of README.md and docs/*.md are rendered from those files into blocks

    <!-- results:NAME -->
    ...generated...
    <!-- /results:NAME -->

so that a published number is always one of a stored run's. `--compare` reruns a target into a
scratch folder and checks the fresh numbers against the committed ones within the target's stated
tolerance (`TOLERANCES`, also printed in the documents); the slow tests call it. `--stale` says,
for every stored target, whether the code its commands run (`softpo/`, `configs/`, the pinned
requirements and the target's own scripts and data) differs between the commit it was measured at
and the working tree: a target that is not stale measured what the current code computes.

The expert study (`experts`, hours) keeps every point with the commit it was measured at, and a
point is stale on its own: when the code and data it ran changed since its commit, when
expert_study.py changed outside its point table, or when the table defines that point differently
now (adding a point stales no other). Rerun, it keeps the current points and measures only the stale
and missing ones; stopped, it continues where it stopped, and `--collect` stores what it has
finished so far.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- results:(?P<name>[\w./-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)",
                   re.S)

sys.path.insert(0, str(ROOT))


# ------------------------------------------------------------------------------------ the machine

def machine() -> dict:
    """What a reader needs to judge whether their run should match: processor, threads, versions."""
    import torch

    from softpo.hardware import bf16_is_fast, cpu_flags

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                  .splitlines() if line.startswith("model name")), platform.processor()) \
        if Path("/proc/cpuinfo").is_file() else platform.processor()
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "fast_bf16": bf16_is_fast("cpu"),
            "bf16_flags": sorted(cpu_flags() & {"amx_bf16", "avx512_bf16"}),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                            ":(exclude)docs", ":(exclude)*.md"],  # documents are not changes
                           cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + ("+changes" if dirty else "") if out.returncode == 0 else "unknown"


def softpo(*args: str) -> list[str]:
    return [sys.executable, "-m", "softpo.cli", *args]


def run_json(argv: list[str], env: dict | None = None) -> dict:
    """Run a command whose stdout is one JSON object; its stderr passes through."""
    shown = " ".join(["softpo", *argv[3:]] if argv[1:3] == ["-m", "softpo.cli"] else argv)
    print(f"results: {shown}", file=sys.stderr, flush=True)
    out = subprocess.run(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True,
                         env=os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
                         | (env or {}))
    return json.loads(out.stdout.strip().splitlines()[-1])


def shown(argv: list[str]) -> str:
    if argv[1:3] == ["-m", "softpo.cli"]:
        return " ".join(["softpo", *argv[3:]])
    return " ".join(["python", *argv[1:]] if argv[0] == sys.executable else argv)


# ------------------------------------------------------------------------------------ targets

@dataclass
class Target:
    """A family of published numbers: how to measure them and how to show them."""

    name: str
    about: str
    minutes: int  # on the 2-core development machine
    measure: Callable[[Path], dict]  # (output folder for files) -> JSON-able results
    blocks: dict[str, Callable[[dict], str]] = field(default_factory=dict)
    compare: Callable[[dict, dict], list[str]] | None = None  # (committed, fresh) -> problems
    needs_gpu: bool = False
    sources: tuple[str, ...] = ()  # what its commands run besides CODE (scripts, bench/, data)
    one_thread: bool = False  # its commands use one core: `--jobs` may run it beside another
    timing: bool = False  # it measures time: it runs with nothing else on the machine
    stale: Callable[[dict], list[str]] | None = None  # (stored) -> why; default: by commit


TARGETS: dict[str, Target] = {}


def target(name: str, about: str, minutes: int, **kw):
    def wrap(measure):
        TARGETS[name] = Target(name, about, minutes, measure, **kw)
        return measure
    return wrap


# What every target's commands run: a change here can change any published number.
CODE = ("softpo", "configs", "pyproject.toml", "requirements.txt")


def block(target_name: str, name: str):
    def wrap(render):
        TARGETS[target_name].blocks[name] = render
        return render
    return wrap


# Tolerances within which a run of the same command on another machine should match (text in
# the documents comes from here). See docs/lab.md, "Reproducing these numbers".
TOLERANCES = {
    "lab": "The labs run on one thread and are bitwise reproducible on one machine. Another "
           "processor's kernels round differently. Rerunning the {runs} runs of the seeds report "
           "with only the rounding changed (length groups off: the same sums in another order) "
           "moved the exact KLs by at most {kl_abs:.1e} nats or {kl_rel:.0%} of their value and the "
           "entropies by at most {entropy_abs:.1e} nats, so a run elsewhere should match within "
           "max({lab_abs:g} nats, {lab_rel:.0%}) (the tolerance `--compare` applies). "
           "{provenance}\n\n{commands}",
}
TOLERANCES["online"] = ("Each run is deterministic on one machine; how far another processor's "
                        "rounding moves these LoRA runs was not measured (`--compare` accepts "
                        "0.02 or 10% per number).")
LAB_ABS, LAB_REL = 5e-5, 0.15  # about 3x and 2x the rounding twin's moves (docs/lab.md)


def _close(a: float | None, b: float | None, abs_tol: float, rel_tol: float) -> bool:
    if a is None or b is None:
        return a is b
    return abs(a - b) <= max(abs_tol, rel_tol * max(abs(a), abs(b)))


def compare_runs(keys: tuple[str, ...], abs_tol: float, rel_tol: float):
    def compare(old: dict, new: dict) -> list[str]:
        problems = []
        for i, (a, b) in enumerate(zip(old["runs"], new["runs"])):
            for k in keys:
                if k in a and not _close(a[k], b.get(k), abs_tol, rel_tol):
                    problems.append(f"run {i} ({a.get('loss')}, alpha {a.get('alpha')}, beta "
                                    f"{a.get('beta')}, seed {a.get('seed')}): {k} {a[k]} -> {b.get(k)}")
        if len(old["runs"]) != len(new["runs"]):
            problems.append(f"{len(old['runs'])} runs committed, {len(new['runs'])} fresh")
        return problems
    return compare


compare_lab = compare_runs(("kl_to_target", "kl_to_own_optimum", "entropy", "drift_mass"),
                           LAB_ABS, LAB_REL)


def table(rows: list[dict], columns: tuple[str, ...], names: dict[str, str] | None = None) -> str:
    from softpo.lab.plots import _cell

    names = names or {}
    head = "| " + " | ".join(names.get(c, c) for c in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    return "\n".join([head, rule] + ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |"
                                     for r in rows])


def provenance(res: dict) -> str:
    m = res["machine"]
    return (f"Measured at commit `{res['commit']}` on {res['date']}: {m['cpu']}, {m['cores']} "
            f"cores, PyTorch {m['torch']}" + (f", GPU {m['gpu']}" if m.get("gpu") else "") + ".")


def commands(res: dict) -> str:
    return "```bash\n" + "\n".join(res["commands"]) + "\n```"


# ------------------------------------------------------------------------ the tabular lab

TABULAR_SEEDS = (0, 1, 2, 3, 4)


@target("lab-tabular", "softpo lab tabular --table, seeds 0-4", 15, one_thread=True)
def measure_tabular(out: Path) -> dict:
    runs, cmds = [], []
    for seed in TABULAR_SEEDS:
        argv = softpo("lab", "tabular", "--table", "--json", "--no-plots", "--seed", str(seed))
        cmds.append(shown(argv))
        runs += run_json(argv)["runs"]
    return {"commands": cmds, "runs": runs}


TARGETS["lab-tabular"].compare = compare_runs(("kl_to_target", "entropy"), 1e-4, 0.25)


@block("lab-tabular", "lab-tabular")
def render_tabular(res: dict) -> str:
    seed0 = [r for r in res["runs"] if r["seed"] == 0]
    rows = []
    for r in seed0:
        knob = f"alpha {r['alpha']:g}" if r["loss"].startswith("spo") else f"beta {r['beta']:g}"
        rows.append({"loss": r["loss"], "knob": knob, "kl": r["kl_to_target"],
                     "floor": r["expected_sampling_kl"],
                     "entropy": f"{r['entropy']:.3f} / {r['target_entropy']:.3f}"})
    worst = max(res["runs"], key=lambda r: r["kl_to_target"])
    return "\n".join([
        table(rows, ("loss", "knob", "kl", "floor", "entropy"),
              {"knob": "alpha / beta", "kl": "KL to target (nats)", "floor": "sampling floor",
               "entropy": "entropy / target entropy"}), "",
        f"Seed 0 above. Over seeds {TABULAR_SEEDS[0]}-{TABULAR_SEEDS[-1]} ({len(res['runs'])} runs) "
        f"the worst KL to the target was {worst['kl_to_target']:.2g} nats ({worst['loss']}, alpha "
        f"{worst['alpha']:g}, seed {worst['seed']}). {provenance(res)}", "", commands(res)])


# ------------------------------------------------------------------------ the sequence lab

def _lab_target(report: str, minutes: int, about: str):
    def measure(out: Path) -> dict:
        argv = softpo("lab", "sequence", "--report", report, "--out", str(out / "lab"), "--json")
        return {"commands": [shown(argv).replace(str(out / "lab"), "docs/lab")],
                "runs": run_json(argv)["runs"], "files": "lab"}
    TARGETS[f"lab-{report}"] = Target(f"lab-{report}", about, minutes, measure, compare=compare_lab,
                                      one_thread=True)


_lab_target("table", 25, "softpo lab sequence --report table (12 runs)")
_lab_target("seeds", 30, "softpo lab sequence --report seeds (SPO, alpha 0.5/1/2 x seeds 0-4)")
_lab_target("growth", 30, "softpo lab sequence --report growth (15 runs)")
_lab_target("growth-large", 45, "softpo lab sequence --report growth-large (15 runs, |Y| = 341)")
_lab_target("drift", 30, "softpo lab sequence --report drift (12 runs, |Y| = 40)")

LAB_TABLE = ("loss", "data", "alpha", "beta", "kl_to_target", "data_floor", "entropy",
             "target_entropy", "kl_to_own_optimum", "own_optimum", "own_optimum_entropy")


@block("lab-table", "lab-table")
def render_lab_table(res: dict) -> str:
    return "\n".join([table(res["runs"], LAB_TABLE), "", provenance(res), "", commands(res)])


@block("lab-table", "lab-table-short")
def render_lab_table_short(res: dict) -> str:
    rows = []
    for r in res["runs"]:
        if r["loss"] not in ("spo", "dpo") or (r["loss"] == "spo" and r["beta"]):
            continue
        knob = f"alpha {r['alpha']:g}" if r["loss"] == "spo" else f"beta {r['beta']:g}"
        rows.append({"loss": r["loss"], "knob": knob, "kl": r["kl_to_target"],
                     "own": r["kl_to_own_optimum"],
                     "entropy": f"{r['entropy']:.3f} / {r['target_entropy']:.3f}"})
    return table(rows, ("loss", "knob", "kl", "own", "entropy"),
                 {"knob": "alpha / beta", "kl": "exact KL to softmax(r/alpha)",
                  "own": "KL to its own optimum", "entropy": "entropy / target entropy"})


@block("lab-seeds", "lab-seeds")
def render_lab_seeds(res: dict) -> str:
    from softpo.lab.seqreport import SEED_COLUMNS, SUMMARY_COLUMNS, seed_summary

    return "\n".join([table(seed_summary(res["runs"]), SUMMARY_COLUMNS), "", "Every run:", "",
                      table(res["runs"], SEED_COLUMNS[:-1]), "", provenance(res), "",
                      commands(res)])


@block("lab-seeds", "lab-seeds-short")
def render_lab_seeds_short(res: dict) -> str:
    from softpo.lab.seqreport import seed_summary

    rows = seed_summary(res["runs"])
    return table(rows, ("alpha", "seeds", "median_kl_to_target", "worst_kl_to_target"),
                 {"median_kl_to_target": "median KL to softmax(r/alpha)",
                  "worst_kl_to_target": "worst"})


def _lab_block(report: str, columns: tuple[str, ...]):
    @block(f"lab-{report}", f"lab-{report}")
    def render(res: dict) -> str:
        return "\n".join([table(res["runs"], columns), "", provenance(res), "", commands(res)])
    return render


_lab_block("growth", ("loss", "beta", "pairs", "entropy", "own_optimum_entropy",
                      "kl_to_own_optimum", "data_floor", "kl_to_target", "kl_to_ref"))
_lab_block("growth-large", ("loss", "beta", "pairs", "unseen_responses", "entropy",
                            "own_optimum_entropy", "kl_to_own_optimum", "kl_to_target",
                            "kl_to_ref"))
_lab_block("drift", ("loss", "beta", "pairs", "unseen_responses", "unseen_mass_ref", "unseen_mass",
                     "drift_mass", "unseen_kl", "kl_to_ref", "entropy"))


@target("lab-rounding", "python scripts/lab_rounding.py: the seeds report with length groups off", 30,
        sources=("scripts/lab_rounding.py",), one_thread=True)
def measure_rounding(out: Path) -> dict:
    argv = [sys.executable, "scripts/lab_rounding.py"]
    return {"commands": [shown(argv)], "runs": run_json(argv)["runs"]}


TARGETS["lab-rounding"].compare = compare_lab


def rounding_moves(seeds: dict, rounding: dict) -> dict[str, float]:
    """The largest differences between the seeds report and its rounding twin."""
    pairs = list(zip(seeds["runs"], rounding["runs"]))
    assert all((a["alpha"], a["seed"]) == (b["alpha"], b["seed"]) for a, b in pairs)
    kl = [(abs(a[k] - b[k]), abs(a[k] - b[k]) / max(abs(a[k]), abs(b[k])))
          for a, b in pairs for k in ("kl_to_target", "kl_to_own_optimum")]
    return {"kl_abs": max(d for d, _ in kl), "kl_rel": max(r for _, r in kl),
            "entropy_abs": max(abs(a["entropy"] - b["entropy"]) for a, b in pairs)}


@block("lab-rounding", "lab-tolerance")
def render_tolerance(res: dict) -> str:
    seeds = load("lab-seeds")
    m = rounding_moves(seeds, res)
    return TOLERANCES["lab"].format(
        runs=len(res["runs"]), kl_abs=m["kl_abs"], kl_rel=m["kl_rel"],
        entropy_abs=m["entropy_abs"], lab_abs=LAB_ABS, lab_rel=LAB_REL,
        provenance=provenance(res), commands=commands(res))


# ------------------------------------------------------------------------ training the tiny model

def scratch(out: Path, name: str) -> Path:
    """Where a target's command writes its run: under runs/ when the target publishes into docs/
    (so a commit of docs/ while it runs takes none of it), else under `out`."""
    return ROOT / "runs" / f"results-{name}" if out == ROOT / "docs" else out / name


@target("train-tiny", "softpo train configs/tiny.yaml (the README's first training run)", 3,
        sources=("examples/data/prefs_tiny.jsonl",))
def measure_train_tiny(out: Path) -> dict:
    run_dir = scratch(out, "train_tiny")
    argv = softpo("train", "configs/tiny.yaml", f"train.output_dir={run_dir}", "train.progress=false")
    print(f"results: {shown(argv)}", file=sys.stderr, flush=True)
    subprocess.run(argv, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    from softpo.tracking import read_metrics

    rows = read_metrics(run_dir / "metrics.jsonl")
    final = {k: v for r in rows for k, v in r.items()}
    shutil.rmtree(run_dir, ignore_errors=True)
    keys = ("step", "loss", "pref_loss", "kl", "rewards/accuracies", "eval_rewards/accuracies",
            "eval_pref_loss")
    return {"commands": [shown(argv).replace(str(run_dir), "runs/tiny")],
            "final": {k: final[k] for k in keys if k in final}}


TARGETS["train-tiny"].compare = lambda old, new: [] if _close(
    old["final"].get("eval_rewards/accuracies"), new["final"].get("eval_rewards/accuracies"), 0.1,
    0.0) else [f"eval accuracy {old['final'].get('eval_rewards/accuracies')} -> "
               f"{new['final'].get('eval_rewards/accuracies')}"]


@block("train-tiny", "train-tiny")
def render_train_tiny(res: dict) -> str:
    f = res["final"]
    return (f"`softpo train configs/tiny.yaml` (a 2-layer byte-level Llama built locally, SPO with "
            f"the global KL regulariser, {f['step']} steps of 16 pairs) ended at held-out "
            f"preference accuracy {f['eval_rewards/accuracies']:.2f} (held-out preference loss "
            f"{f['eval_pref_loss']:.3f}, global KL {f['kl']:.3f} nats). {provenance(res)}")


# ------------------------------------------------------------------------ the main job

DEMO_SEEDS = (0, 1, 2)


def publish_report(run: Path, docs: Path) -> None:
    """Make `docs` hold the run's report (its Markdown and pictures) in place of the last one;
    folders inside `docs` (another target's report) are left alone."""
    docs.mkdir(parents=True, exist_ok=True)
    for f in docs.iterdir():
        if f.is_file() and f.suffix in (".md", ".png"):
            f.unlink()
    for f in run.iterdir():
        if f.suffix in (".md", ".png"):
            shutil.copy(f, docs / f.name)


@target("demo", "softpo demo (what make demo runs), seeds 0, 1, 2", 40)
def measure_demo(out: Path) -> dict:
    import time

    seeds, cmds = {}, []
    for seed in DEMO_SEEDS:
        folder = scratch(out, "demo_runs") / f"seed{seed}"
        argv = softpo("demo", "--seed", str(seed), "--out", str(folder), "--no-progress")
        cmds.append(shown(argv).replace(str(folder), f"runs/demo_{seed}"))
        print(f"results: {cmds[-1]}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        subprocess.run(argv, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        seeds[str(seed)] = {"seconds": round(time.perf_counter() - t0, 1),
                            "results": json.loads((folder / "results.json").read_text())}
        if seed == 0 and out == ROOT / "docs":  # the committed report: seed 0's
            publish_report(folder, ROOT / "docs" / "demo")
    shutil.rmtree(scratch(out, "demo_runs"), ignore_errors=True)
    return {"commands": cmds, "seeds": seeds}


def _demo_models(run: dict) -> dict[str, dict]:
    return {m["name"]: m for m in run["models"]}


def _demo_compare(old: dict, new: dict) -> list[str]:
    """Exact success probability of every model within 0.1 of the committed one, per seed (the
    demo's numbers depend on the processor and its precision: docs/demo.md)."""
    problems = []
    for seed, run in old["seeds"].items():
        fresh = _demo_models(new["seeds"][seed]["results"])
        for name, m in _demo_models(run["results"]).items():
            a = (m["metrics"]["exact"] or {}).get("success")
            b = ((fresh.get(name) or {}).get("metrics", {}).get("exact") or {}).get("success")
            if not _close(a, b, 0.1, 0.0):
                problems.append(f"seed {seed} {name}: success {a} -> {b}")
    return problems


TARGETS["demo"].compare = _demo_compare

DEMO_COLUMNS = (("exact", "success", "success prob."), ("exact", "outside", "mass outside"),
                ("exact", "entropy", "entropy among right (0-1)"),
                ("exact", "coverage", "coverage"), ("exact", "kl_expert", "KL to expert"),
                ("sampled", "pass@1", "pass@1"), ("sampled", "pass@8", "pass@8"),
                ("sampled", "distinct_correct", "different right of 8"),
                ("sampled", "kl", "KL to ref (nats)"))


def _precision(res: dict) -> str:
    m = res["machine"]
    return ("bf16 autocast (this processor has " + ", ".join(m["bf16_flags"]) + ")"
            if m["fast_bf16"] else "float32 (this processor has no fast bf16)")


def _demo_row(model: dict) -> dict:
    metrics = model["metrics"]
    return {label: (metrics.get(part) or {}).get(key) for part, key, label in DEMO_COLUMNS}


@block("demo", "demo-seed0")
def render_demo_seed0(res: dict) -> str:
    seed0 = res["seeds"]["0"]
    run = seed0["results"]
    rows = [{"model": m["name"], **_demo_row(m)} for m in run["models"]]
    return "\n".join([
        table(rows, ("model", *(label for _, _, label in DEMO_COLUMNS))), "",
        f"Seed 0, {run['data']['rows']} training pairs; `make demo` took "
        f"{seed0['seconds'] / 60:.1f} min here (model conversion cached), training in "
        f"{_precision(res)}, exact evaluation in float32. {provenance(res)}"])


@block("demo", "demo-seeds")
def render_demo_seeds(res: dict) -> str:
    import statistics

    keys = (("exact", "success", "success prob."), ("exact", "entropy", "entropy among right"),
            ("sampled", "distinct_correct", "different right of 8"))
    runs = [res["seeds"][s]["results"] for s in sorted(res["seeds"])]
    rows = []
    for name in _demo_models(runs[0]):
        row = {"model": name}
        for part, key, label in keys:
            values = [(_demo_models(r)[name]["metrics"].get(part) or {}).get(key) for r in runs]
            values = [v for v in values if v is not None]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            row[label] = f"{statistics.fmean(values):.3f} ({sd:.3f})" if values else "-"
        rows.append(row)
    return "\n".join([table(rows, ("model", *(label for _, _, label in keys))), "",
                      f"Mean (standard deviation) over seeds {', '.join(sorted(res['seeds']))}. "
                      f"{provenance(res)}", "", commands(res)])


# ------------------------------------------------------------------------ the whole frontier

@target("frontier", "softpo demo --sweep: SPO, DPO, H-DPO, f-DPO and DPO sampled hotter, seeds "
        "0, 1, 2", 75)
def measure_frontier(out: Path) -> dict:
    import time

    folder = scratch(out, "frontier_run")
    argv = softpo("demo", "--sweep", "--out", str(folder), "--no-progress")
    cmd = shown(argv).replace(str(folder), "runs/frontier")
    print(f"results: {cmd}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    doc = json.loads((folder / "results.json").read_text())
    if out == ROOT / "docs":  # the committed report: the means over seeds and their picture
        publish_report(folder, ROOT / "docs" / "demo" / "frontier")
    shutil.rmtree(folder, ignore_errors=True)
    return {"commands": [cmd], "seconds": round(time.perf_counter() - t0, 1), "results": doc}


def _frontier_compare(old: dict, new: dict) -> list[str]:
    """Mean exact success probability of every model within 0.1 of the committed one (as the
    demo's: the numbers depend on the processor and its precision, docs/demo.md)."""
    fresh = {m["name"]: m for m in new["results"]["summary"]}
    problems = []
    for m in old["results"]["summary"]:
        a = (m["mean"]["exact"] or {}).get("success")
        b = ((fresh.get(m["name"]) or {}).get("mean", {}).get("exact") or {}).get("success")
        if not _close(a, b, 0.1, 0.0):
            problems.append(f"{m['name']}: mean success {a} -> {b}")
    return problems


TARGETS["frontier"].compare = _frontier_compare

FRONTIER_COLUMNS = (("exact", "success", "success prob."),
                    ("exact", "entropy", "entropy among right (0-1)"),
                    ("exact", "coverage", "coverage"), ("exact", "outside", "mass outside"),
                    ("sampled", "distinct_correct", "different right of 8"),
                    ("sampled", "kl", "KL to ref (nats)"))


@block("frontier", "frontier")
def render_frontier(res: dict) -> str:
    doc = res["results"]
    rows = []
    for m in doc["summary"]:
        row = {"model": m["name"]}
        for part, key, label in FRONTIER_COLUMNS:
            mean, sd = (m["mean"].get(part) or {}).get(key), (m["sd"].get(part) or {}).get(key)
            row[label] = "-" if mean is None else f"{mean:.3f} ({sd:.3f})"
        rows.append(row)
    seeds = ", ".join(map(str, doc["seeds"]))
    return "\n".join([
        table(rows, ("model", *(label for _, _, label in FRONTIER_COLUMNS))), "",
        f"Mean (standard deviation) over seeds {seeds}; every method trained on the same "
        f"expert-labelled pairs of each seed; `_T<t>`: the model sampled at temperature t. "
        f"{res['seconds'] / 60:.0f} min in all. {provenance(res)}", "", commands(res)])


@block("frontier", "frontier-verdict")
def render_frontier_verdict(res: dict) -> str:
    """For every SPO point: the most even of the other models (reference included) whose mean
    success is at least SPO's, by mean normalised entropy among the right answers."""
    summary = res["results"]["summary"]

    def point(m: dict) -> tuple[float, float, float]:
        e, sd = m["mean"]["exact"], m["sd"]["exact"]
        return e["success"], e["entropy"], sd["entropy"]

    rows = []
    for m in (m for m in summary if m["method"] == "spo"):
        success, entropy, sd = point(m)
        rivals = [o for o in summary if o["method"] != "spo" and point(o)[0] >= success]
        best = max(rivals, key=lambda o: point(o)[1], default=None)
        row = {"SPO": m["name"], "success": f"{success:.3f}", "entropy among right":
               f"{entropy:.3f} ({sd:.3f})"}
        if best is None:
            row.update({"most even other at >= its success": "none", "more even?": "yes"})
        else:
            b_success, b_entropy, b_sd = point(best)
            row.update({"most even other at >= its success":
                        f"{best['name']}: {b_success:.3f}, {b_entropy:.3f} ({b_sd:.3f})",
                        "more even?": "yes" if entropy > b_entropy else "no"})
        rows.append(row)
    columns = ("SPO", "success", "entropy among right", "most even other at >= its success",
               "more even?")
    return "\n".join([table(rows, columns), "",
                      "Means (standard deviation) over the seeds of the table above; `more even?` "
                      "compares means only."])


# ------------------------------------------------------------------------ online against offline

ONLINE_SEEDS = (0, 1, 2)


def run_json_parallel(argvs: list[list[str]], jobs: int = 2) -> list[dict]:
    """Run one-thread commands whose stdout is one JSON object, `jobs` at a time (each run is
    deterministic on one thread, so running them side by side changes only their duration)."""
    from concurrent.futures import ThreadPoolExecutor

    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(lambda argv: run_json(argv, env), argvs))


@target("online", "scripts/online_study.py: online against offline SPO, seeds 0, 1, 2", 15,
        sources=("scripts/online_study.py",))
def measure_online(out: Path) -> dict:
    argvs = [[sys.executable, "scripts/online_study.py", "--seed", str(s), "--json", "--out",
              str(scratch(out, "online_runs"))] for s in ONLINE_SEEDS]
    # the three one-thread seeds side by side: on two cores that takes 1.5 runs' time, not 2
    runs = run_json_parallel(argvs, jobs=len(argvs))
    shutil.rmtree(scratch(out, "online_runs"), ignore_errors=True)
    cmds = [f"OMP_NUM_THREADS=1 python scripts/online_study.py --seed {s} --json"
            for s in ONLINE_SEEDS]
    return {"commands": cmds, "runs": runs}


ONLINE_KEYS = (("exact", "success", "success prob."), ("exact", "outside", "mass outside"),
               ("exact", "entropy", "entropy among right"), ("sampled", "pass@8", "pass@8"),
               ("sampled", "kl", "KL to reference"))


def _online_compare(old: dict, new: dict) -> list[str]:
    problems = []
    for a, b in zip(old["runs"], new["runs"]):
        for ma, mb in zip(a["models"], b["models"]):
            for part, key, _ in ONLINE_KEYS:
                x, y = ma["metrics"][part].get(key), mb["metrics"][part].get(key)
                if not _close(x, y, 0.02, 0.1):
                    problems.append(f"seed {a['seed']} {ma['name']}: {key} {x} -> {y}")
    return problems


TARGETS["online"].compare = _online_compare


@block("online", "online")
def render_online(res: dict) -> str:
    import statistics

    runs = res["runs"]
    rows = []
    for i, model in enumerate(runs[0]["models"]):
        row = {"model": model["name"]}
        for part, key, label in ONLINE_KEYS:
            values = [r["models"][i]["metrics"][part].get(key) for r in runs]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            row[label] = f"{statistics.fmean(values):.3f} ({sd:.3f})"
        calls = [r["models"][i].get("expert_calls") for r in runs]
        row["expert calls"] = "-" if None in calls else f"{statistics.fmean(calls):.0f}"
        rows.append(row)
    r0 = runs[0]
    return "\n".join([
        table(rows, ("model", *(label for _, _, label in ONLINE_KEYS), "expert calls")), "",
        f"Mean (standard deviation) over seeds {', '.join(str(r['seed']) for r in runs)}: "
        f"SPO alpha {r0['alpha']:g}, global KL beta {r0['beta']:g}, {r0['steps']} steps, "
        f"{r0['prompts']} training questions x {r0['responses']} answers; 32 held-out questions, "
        f"exact metrics over their candidate answers, pass@8 and the sequence KL to the reference "
        f"from 8 sampled answers each. Training in {_precision(res)} on one thread. "
        f"{TOLERANCES['online']} {provenance(res)}", "", commands(res)])


# ------------------------------------------------------------------------ a user's expert

# (points, seeds): SPO alpha 1 and DPO at learning rate 1e-3 and at 3e-4 (the config's) on three seeds,
# then each further knob at 3e-4 on three seeds: alpha 0.3, the global KL weight beta 0.5, 2 and
# 0.2, Bradley-Terry labels at temperature 0.1 (every pair), 8 answers per question, ranked lists,
# the weighting mu, online refreshes (SPO and DPO), best-worst pairs with ties kept, and
# Bradley-Terry labels at 0.1 with one pair per question (labels apart from pairs per question)
EXPERT_RUNS = ((("reference", "spo-a1", "dpo", "spo-a1-lr3e-4", "dpo-lr3e-4"), (0, 1, 2)),
               (("spo-a0.3-lr3e-4", "spo-a1-beta0.5-lr3e-4", "spo-a1-beta2-lr3e-4",
                 "spo-a1-beta0.2-lr3e-4", "spo-a1-bt0.1-lr3e-4", "spo-a1-n8-lr3e-4",
                 "spo-a1-ranked-lr3e-4", "spo-a1-mu-lr3e-4", "spo-a1-online-lr3e-4",
                 "dpo-online-lr3e-4", "spo-a1-ties-lr3e-4", "spo-a1-bt0.1-1pair-lr3e-4"),
                (0, 1, 2)))


EXPERTS_WORK = ROOT / "runs" / "results-experts"  # survives a stopped run: finished points stay
EXPERT_STUDY = "scripts/expert_study.py"  # the runner and, in its `points()`, the point table


def _expert_args() -> list[list[str]]:
    return [["--expert", expert, "--points", ",".join(names), "--seeds", *map(str, seeds)]
            for names, seeds in EXPERT_RUNS for expert in ("concise", "plain")]


def _expert_commands() -> list[str]:
    return [f"OMP_NUM_THREADS=1 python {EXPERT_STUDY} " + " ".join(args)
            for args in _expert_args()]


@target("experts", "scripts/expert_study.py: SPO and DPO on the concise and plain experts, at two "
                   "learning rates and further knobs, seeds 0, 1, 2", 520,
        sources=(EXPERT_STUDY, "examples/experts", "examples/data"))
def measure_experts(out: Path) -> dict:
    work = EXPERTS_WORK if out == ROOT / "docs" else out / "expert_runs"
    if out == ROOT / "docs":  # regenerating the published numbers: measure what is stale or missing
        kept = keep_current_points(load("experts"), work)
        print(f"experts: {kept} stored points are current and kept", file=sys.stderr)
    # two at a time, in EXPERT_RUNS's order: the three-seed points first
    argvs = [[sys.executable, EXPERT_STUDY, *args, "--json", "--out",
              str(work / args[1])] for args in _expert_args()]
    points = [p for res in run_json_parallel(argvs) for p in res["points"]]
    shutil.rmtree(work, ignore_errors=True)
    return {"commands": _expert_commands(), "points": points}


def _log_rows(log: Path) -> list[dict]:
    """The points an expert_study.py folder's points.jsonl holds (none if it does not exist)."""
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def collect_experts() -> dict:
    """The stored expert points with those a stopped `results.py experts` finished (in
    EXPERTS_WORK) in their place: each point keeps the commit it was measured at, so `--stale`
    still names the ones older code measured."""
    stored = load("experts") or {"points": []}
    points = {(p["expert"], p["seed"], p["point"]): p for p in stored["points"]}
    for log in sorted(EXPERTS_WORK.glob("*/points.jsonl")):
        points.update({(r["expert"], r["seed"], r["point"]): r for r in _log_rows(log)})
    order = [n for names, _ in EXPERT_RUNS for n in names]
    rows = sorted(points.values(), key=lambda p: (order.index(p["point"]) if p["point"] in order
                                                  else len(order), p["expert"], p["seed"]))
    commits = [p["commit"] for p in rows]
    return {**stored, "target": "experts", "commands": _expert_commands(), "points": rows,
            "commit": max(sorted(set(commits)), key=commits.count),
            "date": datetime.date.today().isoformat(), "machine": machine()}


def keep_current_points(stored: dict | None, work: Path) -> int:
    """Write into `work/<expert>/points.jsonl` the stored points that are what the current code
    computes (`expert_point_staleness`); expert_study.py skips the points its folder holds, so a
    rerun measures only the stale and missing ones. Returns how many were kept."""
    points = (stored or {}).get("points", [])
    kept = 0
    for p, why in zip(points, expert_point_staleness(points)):
        if why:
            continue
        log = work / p["expert"] / "points.jsonl"
        log.parent.mkdir(parents=True, exist_ok=True)
        have = {(r["seed"], r["point"]) for r in _log_rows(log)}
        if (p["seed"], p["point"]) not in have:
            with log.open("a") as f:
                f.write(json.dumps(p) + "\n")
        kept += 1
    return kept


def study_runner(source: str) -> str:
    """expert_study.py's code without its point table (the function `points`), comments and
    layout aside: what every point runs. Adding or redefining one point leaves it unchanged."""
    import ast

    tree = ast.parse(source)
    tree.body = [n for n in tree.body
                 if not (isinstance(n, ast.FunctionDef) and n.name == "points")]
    return ast.dump(tree)


def point_table() -> dict[str, dict]:
    """expert_study.py's points as the working tree defines them, each as the fields a stored
    point row carries (JSON values: the overrides a list)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_expert_study", ROOT / EXPERT_STUDY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while they are made
    spec.loader.exec_module(module)
    return {name: json.loads(json.dumps(vars(p))) for name, p in module.points().items()}


def expert_point_staleness(points: list[dict]) -> list[str | None]:
    """For each stored expert point, why it may not be what the working tree computes (None: it
    is): the code and data it ran changed since its commit (`changed_since`), expert_study.py's
    runner changed (`study_runner`; the other points' definitions do not count), or the point
    is defined differently now or no longer."""
    paths = [*CODE, *(s for s in TARGETS["experts"].sources if s != EXPERT_STUDY)]
    table = point_table()
    runner_now = study_runner((ROOT / EXPERT_STUDY).read_text())
    by_commit: dict[str, str | None] = {}

    def commit_why(sha: str) -> str | None:
        if sha not in by_commit:
            why = changed_since(sha, paths)
            if why is None:
                then = subprocess.run(["git", "show", f"{sha}:{EXPERT_STUDY}"], cwd=ROOT,
                                      capture_output=True, text=True)
                if then.returncode != 0 or study_runner(then.stdout) != runner_now:
                    why = f"{sha}: {EXPERT_STUDY} (all but its point table) changed since"
            by_commit[sha] = why
        return by_commit[sha]

    def point_why(p: dict) -> str | None:
        if why := commit_why(p["commit"]):
            return why
        defined = table.get(p["point"])
        if defined is None:
            return f"{p['point']}: no longer defined in {EXPERT_STUDY}"
        if differ := [k for k, v in defined.items() if p.get(k) != v]:
            return (f"{p['point']}: defined differently now ("
                    + ", ".join(f"{k} {p.get(k)} -> {defined[k]}" for k in differ) + ")")
        return None

    return [point_why(p) for p in points]


def _experts_stale(res: dict) -> list[str]:
    import collections

    count = collections.Counter(why for why in expert_point_staleness(res["points"]) if why)
    return [f"{why} [{n} point{'s' * (n > 1)}]" for why, n in sorted(count.items())]


EXPERT_KEYS = ("reward", "kl", "entropy", "distinct_2", "words", "start_pref_saturated")


def _experts_compare(old: dict, new: dict) -> list[str]:
    fresh = {(p["expert"], p["seed"], p["point"]): p for p in new["points"]}
    problems = []
    for p in old["points"]:
        q = fresh.get((p["expert"], p["seed"], p["point"]), {})
        problems += [f"{p['expert']} seed {p['seed']} {p['point']}: {k} {p.get(k)} -> {q.get(k)}"
                     for k in EXPERT_KEYS[:3] if not _close(p.get(k), q.get(k), 0.02, 0.1)]
    return problems


TARGETS["experts"].compare = _experts_compare
TARGETS["experts"].stale = _experts_stale


def _ref_nll_per_token(point: dict) -> float:
    """The reference's negative log-likelihood of the model's answers per token: (entropy + KL) /
    tokens, since both are means over the same samples of -log pi and log pi - log ref. The
    reference scores its own answers at about 2 nats per token; nonsense scores far higher."""
    return (point["entropy"] + point["kl"]) / point["length"]


EXPERT_LABELS = {"reward": "held-out reward", "kl": "KL to reference", "entropy": "entropy",
                 "ref_nll": "reference NLL / token", "distinct_2": "distinct-2", "words": "words",
                 "start_pref_saturated": "saturated at start",
                 "start_margin": "start margin (nats)"}


def _expert_cells(points: list[dict], keys) -> dict[str, str]:
    """Mean (standard deviation) over the points' seeds of each key; one seed: the value alone."""
    import statistics

    cells = {}
    for k in keys:
        values = [v for p in points if (v := (_ref_nll_per_token(p) if k == "ref_nll"
                                              else p.get(k))) is not None]
        cells[EXPERT_LABELS[k]] = ("-" if not values else f"{values[0]:.3f}" if len(values) == 1
                                   else f"{statistics.fmean(values):.3f} "
                                        f"({statistics.stdev(values):.3f})")
    return cells


def _expert_caption(res: dict, points: list[dict]) -> str:
    """The caption of an experts table: what a cell is and the commit each point was measured at
    (the commit most points share is named first; the others list their points and seeds)."""
    import collections

    seeds = sorted({p["seed"] for p in points})
    commits = collections.Counter(p.get("commit", res["commit"]) for p in points)
    main = commits.most_common(1)[0][0] if commits else res["commit"]
    other: dict = {}  # commit -> point -> seeds, for points measured at another commit
    for p in points:
        if p.get("commit", res["commit"]) != main:
            other.setdefault(p["commit"], {}).setdefault(p["point"], set()).add(p["seed"])
    earlier = "".join(f" At commit `{c}`: " + ", ".join(
        f"{name} (seed{'s' if len(s) > 1 else ''} {', '.join(map(str, sorted(s)))})"
        for name, s in by_name.items()) + "." for c, by_name in sorted(other.items()))
    precision = ("LoRA trained under bf16 autocast, evaluated in float32. "
                 if res["machine"].get("fast_bf16") else "")
    # points are stored without a date: the date is the last store's
    return (f"Mean (standard deviation) over the row's seeds (of {', '.join(map(str, seeds))}; "
            f"one seed: its value alone): 55 held-out questions x 4 sampled answers (32 new "
            f"tokens) per model; KL to the reference and entropy in nats per answer, from the "
            f"samples' log-probs; reference NLL / token = (entropy + KL) / answer tokens, how "
            f"unlikely the reference finds the answers. {precision}{TOLERANCES['online']} "
            f"{provenance({**res, 'commit': main, 'date': 'or before ' + res['date']})}{earlier}")


def render_experts(res: dict, expert: str) -> str:
    points = [p for p in res["points"] if p["expert"] == expert]
    rows = []
    for name in dict.fromkeys(p["point"] for p in points):
        mine = [p for p in points if p["point"] == name]
        rows.append({"model": name, "seeds": len(mine), **_expert_cells(mine, EXPERT_LABELS)})
    return "\n".join([table(rows, ("model", "seeds", *EXPERT_LABELS.values())), "",
                      _expert_caption(res, points), "", commands(res)])


EXPERT_SUMMARY = {"reference": "reference (SmolLM2-135M-Instruct)",  # point -> README label
                  "spo-a1-lr3e-4": "SPO, configs/smollm2_lora.yaml",
                  "dpo-lr3e-4": "DPO beta 0.1, same config"}


@block("experts", "experts-summary")
def render_experts_summary(res: dict) -> str:
    keys = ("reward", "kl", "ref_nll", "distinct_2")
    rows, shown = [], []
    for expert in ("concise", "plain"):
        for name in EXPERT_SUMMARY:
            mine = [p for p in res["points"] if p["expert"] == expert and p["point"] == name]
            shown += mine
            if mine:
                rows.append({"expert": expert, "model": EXPERT_SUMMARY[name],
                             **_expert_cells(mine, keys)})
    return "\n".join([table(rows, ("expert", "model", *(EXPERT_LABELS[k] for k in keys))), "",
                      _expert_caption(res, shown), "", commands(res)])


for _expert in ("concise", "plain"):
    block("experts", f"experts-{_expert}")(lambda res, e=_expert: render_experts(res, e))


# ------------------------------------------------------------------------ speed against TRL

BENCH = {
    "cpu-gpt2-86m": ["--cases", "gpt2-86m", "--precision", "fp32", "--repeats", "2", "--steps",
                     "1", "--warmup", "1", "--variants",
                     "trl-dpo,trl-cpo,spo,spo-shared-prompt,spo-padding-free,dpo,dpo-cached,"
                     "spo-reg,spo-reg-every4"],
    "cpu-smollm2": ["--cases", "smollm2,smollm2-lora", "--precision", "fp32", "--repeats", "1",
                    "--steps", "1", "--warmup", "1", "--variants",
                    "trl-dpo,trl-cpo,spo,spo-shared-prompt,dpo-cached"],
}


def bench_tables(folder: Path) -> dict:
    """{case: {variant: aggregate}} and the peaks, from a bench results folder."""
    from bench.runner import aggregate, load

    peaks, runs = load(folder)
    tables: dict = {}
    for (case, variant, precision), rs in runs.items():
        tables.setdefault(case, {})[variant] = aggregate(rs, peaks.get(precision, float("nan")),
                                                         peaks.get(f"{precision}_cpu", float("nan")))
    return {"peaks": peaks, "tables": tables}


@target("bench-cpu", "python -m bench on the CPU: gpt2-86m and SmolLM2-135M against TRL", 40,
        sources=("bench",), timing=True)
def measure_bench_cpu(out: Path) -> dict:
    cmds, found = [], {}
    for name, args in BENCH.items():
        folder = out / "bench" / name
        shutil.rmtree(folder, ignore_errors=True)
        argv = [sys.executable, "-m", "bench", *args, "--out", str(folder)]
        cmds.append(shown(argv).replace(str(folder), f"docs/bench/{name}"))
        print(f"results: {cmds[-1]}", file=sys.stderr, flush=True)
        subprocess.run(argv, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        found[name] = bench_tables(folder)
        for f in folder.iterdir():  # keep the raw runs and the runner's summary, not its scratch
            if f.name not in ("runs.jsonl", "summary.md"):
                f.unlink()
    return {"commands": cmds, "bench": found}


@block("bench-cpu", "bench-cpu-short")
def render_bench_short(res: dict) -> str:
    t = res["bench"]["cpu-gpt2-86m"]["tables"]["gpt2-86m"]
    cpo, dpo = t["trl-cpo"], t["trl-dpo"]
    label = {"trl-dpo": "TRL DPOTrainer", "trl-cpo": "TRL CPOTrainer (= SPO's pairwise term)",
             "spo": "softpo SPO", "spo-shared-prompt": "softpo SPO, shared prompt",
             "spo-reg": "softpo SPO + global KL, sampled every step",
             "spo-reg-every4": "softpo SPO + global KL, sampled every 4 steps",
             "dpo": "softpo DPO", "dpo-cached": "softpo DPO, cached reference log-probs"}
    rows = []
    for v, name in label.items():
        if v not in t:
            continue
        a = t[v]
        vs = "" if v.startswith("trl") else (
            f"{cpo['step'] / a['step']:.2f}x CPO, {dpo['step'] / a['step']:.2f}x DPO")
        rows.append({"": name, "s/step": f"{a['step']:.1f}", "pairs/s vs TRL": vs,
                     "peak RSS GB": f"{a['rss_gb']:.2f}", "MFU": f"{a['mfu']:.0%}"})
    return "\n".join([table(rows, ("", "s/step", "pairs/s vs TRL", "peak RSS GB", "MFU")), "",
                      f"MFU: model FLOPs per second over the matmul peak measured in the same run "
                      f"({res['bench']['cpu-gpt2-86m']['peaks'].get('fp32', 0):.0f} GFLOP/s fp32). "
                      f"{provenance(res)}", "", commands(res)])


@block("bench-cpu", "bench-cpu")
def render_bench(res: dict) -> str:
    from bench.cases import CASES, RATIOS, VARIANTS

    out = []
    for name, found in res["bench"].items():
        for case, t in found["tables"].items():
            peak = found["peaks"].get("fp32", 0)
            out += [f"**{case}** ({CASES[case].summary}), float32, matmul peak in the run "
                    f"{peak:.0f} GFLOP/s:", "",
                    "| variant | s/step | pairs/s | peak RSS GB | GFLOP/s | MFU | sampling share | runs |",
                    "|---|---|---|---|---|---|---|---|"]
            for v in sorted(t, key=lambda n: list(VARIANTS).index(n)):
                a = t[v]
                out.append(f"| {v} | {a['step']:.2f} | {a['pairs_s']:.2f} | {a['rss_gb']:.2f} | "
                           f"{a['gflops']:.1f} | {a['mfu']:.0%} | {a['sampling']:.0%} | {a['runs']} |")
            ratios = []
            for num, den, kind, want in RATIOS:
                if num in t and den in t and want is not None:
                    a, b = t[num], t[den]
                    value = {"speed": b["step"] / a["step"], "time": a["step"] / b["step"],
                             "memory": a["rss_gb"] / b["rss_gb"]}[kind]
                    ok = value >= want if kind == "speed" else value <= want
                    what = {"speed": "pairs/s", "time": "step time", "memory": "peak memory"}[kind]
                    ratios.append(f"| {num} / {den} | {what} | {value:.2f}x | "
                                  f"{'>=' if kind == 'speed' else '<='} {want} | "
                                  f"{'met' if ok else 'NOT met'} |")
            if ratios:
                out += ["", "| ratio | of | measured | target | |", "|---|---|---|---|---|", *ratios]
            out.append("")
    return "\n".join(out + [provenance(res), "", commands(res)])


# The regulariser's cost alone, side by side with plain SPO and TRL's DPO (a short run).
BENCH_REG = ["--cases", "gpt2-86m", "--precision", "fp32", "--repeats", "2", "--steps", "3",
             "--warmup", "1", "--variants", "trl-dpo,spo,spo-reg,spo-reg-every4"]


@target("bench-reg", "python -m bench: full SPO against plain SPO and TRL DPO, gpt2-86m, CPU", 12,
        sources=("bench",), timing=True)
def measure_bench_reg(out: Path) -> dict:
    folder = scratch(out, "bench-reg")
    shutil.rmtree(folder, ignore_errors=True)
    argv = [sys.executable, "-m", "bench", *BENCH_REG, "--out", str(folder)]
    cmd = shown(argv).replace(str(folder), "runs/bench-reg")
    print(f"results: {cmd}", file=sys.stderr, flush=True)
    subprocess.run(argv, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    res = {"commands": [cmd], "bench": {"cpu-reg": bench_tables(folder)}}
    shutil.rmtree(folder, ignore_errors=True)
    return res


block("bench-reg", "bench-reg")(lambda res: render_bench(res))


# Data preparation at scale: softpo's start-up data path against TRL's, 200,000 rows.
DATA_PREP = ["--rows", "200000", "--forms", "plain,chat", "--repeats", "1"]


@target("data-prep", "python -m bench.data_prep: 200,000 pairs, softpo against TRL", 30,
        sources=("bench",), timing=True)
def measure_data_prep(out: Path) -> dict:
    folder = scratch(out, "data-prep")
    argv = [sys.executable, "-m", "bench.data_prep", *DATA_PREP, "--out", str(folder)]
    cmd = shown(argv).replace(str(folder), "runs/data_prep")
    print(f"results: {cmd}", file=sys.stderr, flush=True)
    subprocess.run(argv, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    runs = [json.loads(line) for line in (folder / "runs.jsonl").read_text().splitlines()]
    summary = (folder / "summary.md").read_text()
    shutil.rmtree(folder, ignore_errors=True)
    return {"commands": [cmd], "runs": runs, "summary": summary}


@block("data-prep", "data-prep")
def render_data_prep(res: dict) -> str:
    return "\n".join([res["summary"].rstrip(), "", provenance(res), "", commands(res)])


# ------------------------------------------------------------------------ running and rendering

def measure(name: str, out: Path | None = None) -> dict:
    t = TARGETS[name]
    scratch = out or ROOT / "docs"
    start = datetime.datetime.now(datetime.timezone.utc)
    sha = commit()  # the code the commands start with (a commit made meanwhile is not theirs)
    res = t.measure(scratch)
    res.update(target=name, commit=sha, date=start.strftime("%Y-%m-%d"), machine=machine(),
               minutes=round((datetime.datetime.now(datetime.timezone.utc) - start)
                             .total_seconds() / 60, 1))
    return res


def measured_at(res: dict) -> list[str]:
    """The commits a stored target was measured at (several where its parts were measured apart)."""
    found = [c.strip() for c in str(res["commit"]).split(",")]
    found += [p["commit"] for p in res.get("points", []) if "commit" in p]
    return sorted(set(found))


def changed_since(sha: str, paths) -> str | None:
    """Why numbers measured at commit `sha` may not be what the working tree computes: the files
    among `paths` it changed or removed since (None when there are none)."""
    base = sha.removesuffix("+changes")
    if base != sha:
        return f"{sha}: measured with uncommitted changes"
    # files added since cannot have changed what ran then (a file that imports them can)
    diff = subprocess.run(["git", "diff", "--name-only", "--diff-filter=a", base, "--", *paths],
                          cwd=ROOT, capture_output=True, text=True)
    if diff.returncode != 0:
        return f"{sha}: not a commit of this repository"
    if changed := diff.stdout.split():
        return (f"{sha}: {len(changed)} files changed since ("
                + ", ".join(changed[:4]) + (", ..." if len(changed) > 4 else "") + ")")
    return None


def stale(name: str) -> list[str]:
    """Why the stored numbers of a target may not be what the current code computes: for each
    commit they were measured at, the files of its code that the working tree changed or removed
    since."""
    res = load(name)
    if res is None:
        return []  # publishes nothing
    if TARGETS[name].stale is not None:
        return TARGETS[name].stale(res)
    paths = [*CODE, *TARGETS[name].sources]
    return [why for sha in measured_at(res) if (why := changed_since(sha, paths))]


def save(res: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{res['target']}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)  # atomic: a killed run leaves the committed file intact
    return path


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def renderers() -> dict[str, tuple[str, Callable[[dict], str]]]:
    return {b: (t.name, fn) for t in TARGETS.values() for b, fn in t.blocks.items()}


def rendered(text: str, cache: dict) -> str:
    known = renderers()

    def fill(m: re.Match) -> str:
        name = m.group("name")
        if name not in known:
            raise SystemExit(f"results: unknown block '{name}'")
        target_name, fn = known[name]
        res = cache.setdefault(target_name, load(target_name))
        if res is None:
            return m.group(0)  # not measured yet: leave what is there
        return m.group(1) + fn(res).rstrip() + "\n" + m.group(4)

    return BLOCK.sub(fill, text)


def render(check: bool = False) -> list[Path]:
    """Re-render every block; with `check`, write nothing and return the documents that differ."""
    cache: dict = {}
    stale = []
    for path in DOCUMENTS:
        text = path.read_text()
        new = rendered(text, cache)
        if new != text:
            stale.append(path)
            if not check:
                path.write_text(new)
    return stale


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/results.py", description=__doc__.split("\n")[0])
    p.add_argument("targets", nargs="*", help="targets to run (default: all that can run here)")
    p.add_argument("--list", action="store_true", help="list the targets")
    p.add_argument("--render", action="store_true", help="only re-render the documents")
    p.add_argument("--check", action="store_true", help="exit 1 if a document is stale")
    p.add_argument("--compare", action="store_true",
                   help="rerun the targets in a scratch folder and compare with docs/results")
    p.add_argument("--jobs", type=int, default=1,
                   help="run this many one-thread targets (the labs) at a time")
    p.add_argument("--stale", action="store_true",
                   help="list the stored targets whose code changed since they were measured "
                        "(exit 1 if any)")
    p.add_argument("--only-stale", action="store_true",
                   help="of the targets, run only those that --stale lists (measured by code "
                        "that has changed since)")
    p.add_argument("--collect", action="store_true",
                   help="store the expert points a stopped run finished (runs/results-experts) "
                        "in place of the stored ones, without running anything")
    a = p.parse_args(argv)
    if a.collect:
        print(f"results: wrote {save(collect_experts()).relative_to(ROOT)}", file=sys.stderr)
        render()
        return 0
    if a.list:
        for t in TARGETS.values():
            print(f"{t.name:<18} ~{t.minutes:>3} min  {t.about}")
        return 0
    if a.stale:
        found = {n: stale(n) for n in (a.targets or TARGETS)}
        for n, why in found.items():
            print(f"{n:<18} " + ("not measured" if load(n) is None else "current" if not why
                                  else "\n".join(
                ["stale"] + [f"{'':<18}   {w}" for w in why])))
        return 1 if any(found.values()) else 0
    if a.check or a.render:
        differ = render(check=a.check)
        for path in differ:
            print(f"results: {path.relative_to(ROOT)} differs from its rendering", file=sys.stderr)
        return 1 if (a.check and differ) else 0
    import torch

    names = a.targets or [n for n, t in TARGETS.items() if not t.needs_gpu or torch.cuda.is_available()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise SystemExit(f"results: unknown target(s) {', '.join(unknown)} (see --list)")
    if a.only_stale:
        skip = [n for n in names if not stale(n)]  # current, or never measured (publish nothing)
        if skip:
            print(f"results: not stale, not run: {', '.join(skip)}", file=sys.stderr)
        names = [n for n in names if n not in skip]
    if not a.compare:
        run_targets(names, a.jobs)
        return 0
    failed = 0
    for name in names:
        old = load(name)
        with tempfile.TemporaryDirectory(prefix="softpo-results-") as tmp:
            new = measure(name, Path(tmp))
        problems = TARGETS[name].compare(old, new) if old and TARGETS[name].compare else \
            ["nothing committed to compare with"]
        print(f"results: {name}: " + ("matches" if not problems else
                                      f"{len(problems)} differences\n  " + "\n  ".join(problems)))
        failed += bool(problems)
    return 1 if failed else 0


def run_targets(names: list[str], jobs: int = 1) -> None:
    """Measure, store and render each target. With `jobs` > 1 the one-thread targets run that many
    at a time (each is deterministic on its one thread, so only their durations change), then the
    others one by one; a timing target always runs with nothing else."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    lock = threading.Lock()

    def one(name: str) -> None:
        print(f"results: {name} ({TARGETS[name].about}, ~{TARGETS[name].minutes} min)",
              file=sys.stderr, flush=True)
        if TARGETS[name].timing and os.getloadavg()[0] > 0.5:
            print(f"results: warning: load average {os.getloadavg()[0]:.1f} before {name}, which "
                  "measures time: its numbers will be slow by whatever else runs",
                  file=sys.stderr, flush=True)
        res = measure(name)
        with lock:
            print(f"results: wrote {os.path.relpath(save(res), ROOT)}", file=sys.stderr)
            render()

    side = [n for n in names if jobs > 1 and TARGETS[n].one_thread]
    with ThreadPoolExecutor(max(jobs, 1)) as pool:
        list(pool.map(one, side))
    for name in names:
        if name not in side:
            one(name)


if __name__ == "__main__":
    sys.exit(main())
