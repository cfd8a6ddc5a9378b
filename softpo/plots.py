"""PNG plots for run reports (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from softpo.tracking import read_metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_curves(runs: dict[str, Path], out: Path, keys=("pref_loss", "rewards/accuracies",
                                                             "kl")) -> Path:
    """One panel per metric, one line per run, read from each run's metrics.jsonl."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4))
    for ax, key in zip(axes, keys):
        for name, run_dir in runs.items():
            rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if key in r]
            if rows:
                ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=name)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def reward_vs_kl(points: dict[str, tuple[float, float]], out: Path) -> Path:
    """Each model's held-out reward against its KL to the reference."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    for name, (kl, reward) in points.items():
        ax.scatter([kl], [reward], s=40)
        ax.annotate(name, (kl, reward), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("KL to reference (nats / response)")
    ax.set_ylabel("mean expert reward (held out)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def entropy_vs_alpha(alphas: list[float], entropies: list[float], lines: dict[str, float],
                     out: Path) -> Path:
    """SPO's sample entropy over alpha, the other methods as horizontal lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    order = sorted(range(len(alphas)), key=alphas.__getitem__)
    ax.plot([alphas[i] for i in order], [entropies[i] for i in order], "o-", label="SPO")
    for name, value in lines.items():
        ax.axhline(value, linestyle="--", linewidth=1, label=name, color=None)
    ax.set_xscale("log")
    ax.set_xlabel("alpha (softness)")
    ax.set_ylabel("entropy of samples (nats / response)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


@dataclass(frozen=True)
class FrontierPoint:
    """One model on the frontier, with error bars (0 for one seed); the points of a `group` are
    joined by a line in `order`."""

    label: str
    group: str
    entropy: float  # normalised entropy among the right answers
    success: float  # success probability
    entropy_err: float = 0.0
    success_err: float = 0.0
    order: float = 0.0


def frontier(points: list[FrontierPoint], out: Path, target: tuple[float, float] | None = None,
             title: str = "") -> Path:
    """Success probability against normalised entropy among the right answers, one labelled point
    per model, a line through each group; `target` (entropy, success) drawn as a star."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 5.4))
    groups = dict.fromkeys(p.group for p in points)
    for i, group in enumerate(groups):
        mine = sorted((p for p in points if p.group == group), key=lambda p: p.order)
        color = f"C{i % 10}"
        ax.plot([p.entropy for p in mine], [p.success for p in mine], "-", color=color,
                alpha=0.5, linewidth=1)
        ax.errorbar([p.entropy for p in mine], [p.success for p in mine],
                    xerr=[p.entropy_err for p in mine], yerr=[p.success_err for p in mine],
                    fmt="o", color=color, label=group, capsize=2, markersize=5)
        for p in mine:
            ax.annotate(p.label, (p.entropy, p.success), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
    if target is not None:
        ax.scatter([target[0]], [target[1]], marker="*", s=160, color="black", zorder=3,
                   label="expert softmax(r/T)")
    ax.set_xlabel("normalised entropy among the right answers (1 = equal shares)")
    ax.set_ylabel("success probability (exact, held out)")
    ax.set_xlim(-0.02, 1.05)
    ax.set_ylim(-0.02, 1.05)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


METHODS = {"reference": ("reference", None), "spo": ("SPO", "alpha"), "dpo": ("DPO", "beta"),
           "hdpo": ("H-DPO", "alpha"), "fdpo": ("f-DPO", None)}  # method -> (label, its knob)


def _group(entry: dict) -> tuple[str, float]:
    """A model's line on the frontier and its place on it: SPO by alpha, DPO by beta, H-DPO by
    alpha, a model sampled hotter by temperature, f-DPO in plan order."""
    label, knob = METHODS[entry["method"]]
    if entry["temperature"] != 1.0:
        beta = entry["knobs"].get("beta")
        return f"{label}{'' if beta is None else f' beta {beta:g}'} sampled hotter, by T", \
            entry["temperature"]
    if knob is None:
        return label, 0.0
    return f"{label} over {knob}", entry["knobs"][knob]


def frontier_points(doc: dict) -> list[FrontierPoint]:
    """The frontier of a demo document: a run's models, or a sweep's means with sd as error bars
    (`softpo.demo_report`)."""
    points = []
    if doc["kind"] == "run":
        entries = [(m, m["metrics"], None) for m in doc["models"]]
    else:
        entries = [(m, m["mean"], m["sd"]) for m in doc["summary"]]
    for entry, mean, sd in entries:
        if not mean.get("exact") or mean["exact"].get("entropy") is None:
            continue
        group, order = _group(entry)
        err = (sd or {}).get("exact") or {}
        points.append(FrontierPoint(entry["name"], group, mean["exact"]["entropy"],
                                    mean["exact"]["success"], err.get("entropy") or 0.0,
                                    err.get("success") or 0.0, order))
    return points


def frontier_plot(doc: dict, out: Path) -> Path:
    """frontier.png of a demo document (run or sweep)."""
    expert = doc.get("expert") or {}
    target = (expert["entropy"], expert["success"]) if "entropy" in expert else None
    seeds = doc["seeds"] if doc["kind"] != "run" else [doc["seed"]]
    title = (f"{doc['task']}, {doc['model']}, seed{'s' if len(seeds) > 1 else ''} "
             f"{', '.join(map(str, seeds))}" + (" (mean ± sd)" if len(seeds) > 1 else ""))
    return frontier(frontier_points(doc), out, target, title)


def demo_plots(doc: dict, out: Path) -> list[str]:
    """A demo run's pictures (`softpo.demo_report`); returns their file names (relative to
    `out`): the frontier where the task has candidate sets, else reward against KL and entropy
    against alpha; and the training curves."""
    models = doc["models"]
    names = []
    if doc.get("expert"):
        names.append(frontier_plot(doc, out / "frontier.png").name)
    else:
        sampled = [(m, m["metrics"]["sampled"]) for m in models]
        reward_vs_kl({m["name"]: (x["kl"], x["reward"]) for m, x in sampled
                      if x.get("kl") is not None}, out / "reward_vs_kl.png")
        spo = [(m["knobs"]["alpha"], x["entropy"]) for m, x in sampled
               if m["method"] == "spo" and x.get("entropy") is not None]
        lines = {m["name"]: x["entropy"] for m, x in sampled
                 if m["method"] != "spo" and x.get("entropy") is not None}
        entropy_vs_alpha([a for a, _ in spo], [e for _, e in spo], lines,
                         out / "entropy_vs_alpha.png")
        names += ["reward_vs_kl.png", "entropy_vs_alpha.png"]
    runs = {m["run"]: out / m["run"] for m in models if m["run"]}
    training_curves(runs, out / "training_curves.png")
    return names + ["training_curves.png"]
