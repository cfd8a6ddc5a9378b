"""PNG plots for run reports (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import re
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


def demo_plots(results, settings, out: Path) -> list[str]:
    """The demo's three pictures; returns their file names (relative to `out`)."""
    runs = {r.name: Path(r.run_dir) for r in results if r.run_dir}
    training_curves(runs, out / "training_curves.png")
    reward_vs_kl({r.name: (r.metrics.get("kl", 0.0), r.metrics.get("reward", 0.0))
                  for r in results}, out / "reward_vs_kl.png")
    spo = [(float(re.sub(r"^spo_alpha", "", r.name)), r.metrics["entropy"])
           for r in results if r.name.startswith("spo_alpha")]
    lines = {r.name: r.metrics["entropy"] for r in results if not r.name.startswith("spo_alpha")}
    entropy_vs_alpha([a for a, _ in spo], [e for _, e in spo], lines, out / "entropy_vs_alpha.png")
    return ["training_curves.png", "reward_vs_kl.png", "entropy_vs_alpha.png"]
