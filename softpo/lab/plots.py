"""Pictures and Markdown for the tabular lab (matplotlib with the Agg backend; imported lazily)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from softpo.lab import optima  # noqa: E402
from softpo.lab.optima import Problem  # noqa: E402
from softpo.losses import get_loss  # noqa: E402

MAX_PANELS = 4


def plot_probs(path: Path, result: dict) -> Path:
    """Learned versus target probabilities per context, responses sorted by reward (best left)."""
    problem: Problem = result["_problem"]
    policy, target = result["_policy"].exp(), result["_target"].exp()  # (C, K)
    panels = min(problem.contexts, MAX_PANELS)
    fig, axes = plt.subplots(panels, 1, figsize=(max(6.0, 0.45 * problem.k), 2.8 * panels),
                             squeeze=False)
    x = torch.arange(problem.k)
    for c, ax in enumerate(axes[:, 0]):
        order = problem.rewards[c].argsort(descending=True)
        ax.bar(x - 0.2, target[c, order], width=0.4, label="predicted optimum", color="#9ecae1")
        ax.bar(x + 0.2, policy[c, order], width=0.4, label="trained policy", color="#08519c")
        ax.plot(x, problem.ref_logps[c, order].exp(), "k.", label="pi_ref")
        ax.set_xticks(x, [f"{problem.rewards[c, i]:.1f}" for i in order], fontsize=7)
        ax.set_ylabel(f"context {c}: probability")
        ax.set_xlabel("response (labelled by reward r)")
    axes[0, 0].legend(fontsize=8)
    knobs = (f"alpha={result['alpha']:g}, " if get_loss(result["loss"]).is_spo else "")
    knobs += f"beta={result['beta']:g}"
    axes[0, 0].set_title(f"{result['loss']} ({result['data']}), {knobs}: "
                         f"KL to optimum {result['kl_to_target']:.4f} nats")
    return save_figure(fig, path)


def plot_sweep(path: Path, problem: Problem, rows: list[dict]) -> Path:
    """Entropy of softmax(r/alpha) over alpha, of pi_ref exp(r/beta) over beta, and trained runs."""
    grid = torch.logspace(-1.5, 1.5, 121, dtype=torch.float64)
    spo = [optima.entropy(optima.spo_optimum(problem, a.item())).mean().item() for a in grid]
    dpo = [optima.entropy(optima.dpo_optimum(problem, b.item())).mean().item() for b in grid]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(grid, spo, color="#08519c", label="SPO optimum softmax(r/alpha), x = alpha")
    ax.plot(grid, dpo, color="#a63603", label="DPO optimum pi_ref exp(r/beta), x = beta")
    for name, color, knob in (("spo", "#08519c", "alpha"), ("dpo", "#a63603", "beta")):
        pts = [(r[knob], r["entropy"]) for r in rows if r["loss"] == name]
        if pts:
            ax.plot(*zip(*pts), "o", color=color, mfc="none", label=f"trained {name.upper()}")
    ax.axhline(math.log(problem.k), color="grey", ls=":", label="uniform (log K)")
    ax.axhline(optima.entropy(problem.ref_logps).mean().item(), color="grey", ls="--",
               label="pi_ref")
    ax.set_xscale("log")
    ax.set_xlabel("alpha (SPO)  /  beta (DPO)")
    ax.set_ylabel("entropy (nats)")
    ax.set_title(f"Entropy control: SPO versus DPO (K={problem.k})")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def markdown_table(rows: list[dict], columns: tuple[str, ...]) -> str:
    """Rows of dicts as a Markdown table of `columns`."""
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def write_report(path: Path, title: str, setup: str, table: str,
                 images: list[str] | None = None) -> Path:
    """A Markdown report: title, setup line, table and images."""
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}", "", setup, "", table, ""]
    parts += [f"![{name}]({name})\n" for name in images or []]
    path.write_text("\n".join(parts))
    return path


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def save_figure(fig, path: Path) -> Path:
    """Write a finished figure as PNG (creating the folder) and free it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
