"""The sequence lab's experiments (`softpo lab sequence --report NAME`), tables and pictures.

    table    SPO (pairs) at alpha 0.5 / 1 / 2, SPO best-of-n and ranked, SPO with the global KL,
             and the baselines DPO (beta 0.5 / 1 / 2), IPO, SimPO, CPO: exact KL to softmax(r/alpha)
             and to each loss's own optimum, entropies.
    growth   the same training budget on 2^6 .. 2^14 preference pairs: entropy and KL to the
             predicted optimum of SPO (beta = 0), SPO with the global KL, and DPO.
    growth-large  the same on a world of |Y| = 341 responses (letters abcd, up to 4), where small
             data sets compare most pairs once, one way, and leave many responses in no example.
    seeds    SPO (pairs, beta = 0) at alpha 0.5 / 1 / 2 over seeds 0-4 (each seed its own world,
             reference, data and samples): median and worst exact KL to softmax(r/alpha).
    drift    few pairs on the larger world (|Y| = 40), so that some responses are in no example:
             the mass the trained model puts on them against the reference's, for SPO with the
             global KL (fresh samples), DPO (in-data regularisation only) and SPO with beta = 0.
Each writes `<out>/<name>.md` (its table, the setup, the commands) and `<out>/lab_sequence_*.png`.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from softpo.lab import seqmodel  # noqa: E402
from softpo.lab.plots import markdown_table, save_figure  # noqa: E402
from softpo.lab.sequence import SeqConfig, public, run  # noqa: E402

DRIFT_WORLD = {"letters": "abc", "max_len": 3}  # |Y| = 40: room for responses no example shows


def _runs(base: SeqConfig, changes: list[dict], echo: bool) -> list[dict]:
    results = []
    for change in changes:
        result = run(replace(base, data=None, **change))  # data: each loss's own kind
        results.append(result)
        if echo:
            print(f"  {result['loss']:<14} alpha={result['alpha']:<4g} beta={result['beta']:<5g} "
                  f"pairs={result['pairs']:<6} KL->target {result['kl_to_target']:.4f}  "
                  f"KL->own {_fmt(result['kl_to_own_optimum'])}  H {result['entropy']:.3f}  "
                  f"{result['seconds']:.0f} s", flush=True)
    return results


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _write(out: Path | None, name: str, title: str, setup: str, table: str,
           images: list[str]) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}", "", setup, "", table, ""] + [f"![{i}]({i})" for i in images]
    (out / f"{name}.md").write_text("\n".join(parts) + "\n")


def setup_line(cfg: SeqConfig, size: int) -> str:
    return (f"Letters `{cfg.letters}`, responses of at most {cfg.max_len} letters (|Y| = {size}); "
            f"r ~ {cfg.reward_scale:g} N(0, 1), reference fitted to softmax({cfg.ref_scale:g} "
            f"N(0, 1)) ({cfg.sft_steps} exact maximum-likelihood steps); Llama {cfg.n_layer} x "
            f"{cfg.n_embd}; Trainer: AdamW lr {cfg.lr:g} ({cfg.warmup_steps} warm-up steps, "
            f"cosine, beta2 {cfg.adam_beta2:g}), {cfg.steps} steps x {cfg.batch_size} examples, "
            f"global KL (beta > 0) with the `{cfg.estimator}` estimator on {cfg.samples} fresh "
            f"samples per step; seed {cfg.seed}. KL in nats, exact over Y.")


# ------------------------------------------------------------------------------------------ table

TABLE_RUNS = ([{"loss": "spo", "alpha": a, "beta": 0.0} for a in (0.5, 1.0, 2.0)]
              + [{"loss": "spo_best_of_n", "alpha": 1.0, "beta": 0.0},
                 {"loss": "spo_ranked", "alpha": 1.0, "beta": 0.0},
                 {"loss": "spo", "alpha": 1.0, "beta": 0.5}]
              + [{"loss": "dpo", "alpha": 1.0, "beta": b} for b in (0.5, 1.0, 2.0)]
              + [{"loss": name, "alpha": 1.0, "beta": 1.0} for name in ("ipo", "simpo", "cpo")])
TABLE_COLUMNS = ("loss", "data", "alpha", "beta", "kl_to_target", "data_floor", "entropy", "target_entropy",
                 "kl_to_own_optimum", "own_optimum", "own_optimum_entropy", "seconds")


def table(base: SeqConfig, out: Path | None, echo: bool = True) -> list[dict]:
    results = _runs(base, TABLE_RUNS, echo)
    rows = [public(r) for r in results]
    text = markdown_table(rows, TABLE_COLUMNS)
    if out is not None:
        spo = [r for r in results if r["loss"] == "spo" and r["beta"] == 0]
        plot_probs(out / "lab_sequence_probs.png", spo)
        plot_entropy(out / "lab_sequence_entropy.png", results)
        plot_curves(out / "lab_sequence_curves.png", results)
    _write(out, "table", "Sequence lab: distance to the predicted optima", setup_line(
        base, rows[0]["responses"]), text, ["lab_sequence_probs.png", "lab_sequence_entropy.png",
                                            "lab_sequence_curves.png"])
    if echo:
        print(text)
    return rows


# ------------------------------------------------------------------------------------------ seeds

SEED_ALPHAS = (0.5, 1.0, 2.0)
SEEDS = (0, 1, 2, 3, 4)
SEED_COLUMNS = ("alpha", "seed", "kl_to_target", "data_floor", "entropy", "target_entropy", "sft_kl",
                "seconds")
SUMMARY_COLUMNS = ("alpha", "seeds", "median_kl_to_target", "worst_kl_to_target", "worst_seed")


def seeds(base: SeqConfig, out: Path | None, echo: bool = True) -> list[dict]:
    """SPO's convergence across seeds: every seed draws its own world, reference and data."""
    changes = [{"loss": "spo", "alpha": a, "beta": 0.0, "seed": s}
               for a in SEED_ALPHAS for s in SEEDS]
    rows = [public(r) for r in _runs(base, changes, echo)]
    summary = seed_summary(rows)
    text = (markdown_table(summary, SUMMARY_COLUMNS) + "\n\nEvery run:\n\n"
            + markdown_table(rows, SEED_COLUMNS))
    _write(out, "seeds", "Sequence lab: SPO across seeds", setup_line(base, rows[0]["responses"])
           .replace(f"seed {base.seed}", f"seeds {SEEDS[0]}-{SEEDS[-1]}"), text, [])
    if echo:
        print(text)
    return rows


def seed_summary(rows: list[dict]) -> list[dict]:
    """Per alpha: the median and the worst KL to softmax(r/alpha) over the seeds."""
    out = []
    for alpha in dict.fromkeys(r["alpha"] for r in rows):
        runs = sorted((r for r in rows if r["alpha"] == alpha), key=lambda r: r["kl_to_target"])
        kls = [r["kl_to_target"] for r in runs]
        median = kls[len(kls) // 2] if len(kls) % 2 else (kls[len(kls) // 2 - 1] + kls[len(kls) // 2]) / 2
        out.append({"alpha": alpha, "seeds": len(runs), "median_kl_to_target": median,
                    "worst_kl_to_target": kls[-1], "worst_seed": runs[-1]["seed"]})
    return out


# ----------------------------------------------------------------------------------------- growth

GROWTH_PAIRS = (64, 256, 1024, 4096, 16384)
GROWTH_METHODS = ({"loss": "spo", "beta": 0.0}, {"loss": "spo", "beta": 0.5},
                  {"loss": "dpo", "beta": 1.0})
GROWTH_COLUMNS = ("loss", "beta", "pairs", "entropy", "own_optimum_entropy", "kl_to_own_optimum",
                  "kl_to_target", "kl_to_ref", "seconds")


GROWTH_LARGE_WORLD = {"letters": "abcd", "max_len": 4}  # |Y| = 341
GROWTH_LARGE_COLUMNS = GROWTH_COLUMNS[:3] + ("unseen_responses",) + GROWTH_COLUMNS[3:]


GROWTH_CHANGES = [dict(m, alpha=1.0, pairs=n) for m in GROWTH_METHODS for n in GROWTH_PAIRS]


def growth(base: SeqConfig, out: Path | None, echo: bool = True) -> list[dict]:
    return _experiment(base, GROWTH_CHANGES, out, echo, "growth",
                       "Sequence lab: more preference data", GROWTH_COLUMNS, plot_growth)


def growth_large(base: SeqConfig, out: Path | None, echo: bool = True) -> list[dict]:
    return _experiment(replace(base, **GROWTH_LARGE_WORLD), GROWTH_CHANGES, out, echo,
                       "growth-large",
                       "Sequence lab: more preference data on a larger world",
                       GROWTH_LARGE_COLUMNS, plot_growth)


# ------------------------------------------------------------------------------------------ drift

DRIFT_PAIRS = (25, 100, 400)
DRIFT_METHODS = ({"loss": "spo", "beta": 0.5}, {"loss": "spo", "beta": 2.0},
                 {"loss": "dpo", "beta": 1.0}, {"loss": "spo", "beta": 0.0})
DRIFT_COLUMNS = ("loss", "beta", "pairs", "unseen_responses", "unseen_mass_ref", "unseen_mass",
                 "drift_mass", "unseen_kl", "kl_to_ref", "entropy", "seconds")


def drift(base: SeqConfig, out: Path | None, echo: bool = True) -> list[dict]:
    changes = [dict(m, alpha=1.0, pairs=n) for n in DRIFT_PAIRS for m in DRIFT_METHODS]
    return _experiment(replace(base, **DRIFT_WORLD), changes, out, echo, "drift",
                       "Sequence lab: mass moved onto responses no example shows", DRIFT_COLUMNS,
                       plot_drift)


def _experiment(base: SeqConfig, changes: list[dict], out: Path | None, echo: bool, name: str,
                title: str, columns: tuple[str, ...], plot) -> list[dict]:
    """Run `changes` on `base`; write `<out>/<name>.md` with the table and one picture."""
    rows = [public(r) for r in _runs(base, changes, echo)]
    text = markdown_table(rows, columns)
    image = f"lab_sequence_{name}.png"
    if out is not None:
        plot(out / image, rows)
    _write(out, name, title, setup_line(base, rows[0]["responses"]), text, [image])
    if echo:
        print(text)
    return rows


EXPERIMENTS = {"table": table, "seeds": seeds, "growth": growth, "growth-large": growth_large,
               "drift": drift}


# ------------------------------------------------------------------------------------------ plots

def _label(r: dict) -> str:
    knob = f"alpha={r['alpha']:g}" if r["loss"].startswith("spo") else ""
    if not r["loss"].startswith("spo") or r["beta"]:
        knob += ("," if knob else "") + f"beta={r['beta']:g}"
    return f"{r['loss']} {knob}"


def plot_run(path: Path, r: dict) -> Path:
    return plot_probs(path, [r])


def plot_probs(path: Path, results: list[dict]) -> Path:
    """Trained versus target probability of every response, sorted by reward (best left)."""
    fig, axes = plt.subplots(len(results), 1, figsize=(8, 2.6 * len(results)), squeeze=False)
    for ax, r in zip(axes[:, 0], results):
        order = r["_rewards"].argsort(descending=True)
        x = torch.arange(len(order))
        own = r["_optimum"] if r["_optimum"] is not None else r["_target"]
        ax.bar(x - 0.2, own.exp()[order], 0.4, color="#9ecae1", label="predicted optimum")
        ax.bar(x + 0.2, r["_policy"].exp()[order], 0.4, color="#08519c", label="trained model")
        ax.plot(x, r["_ref"].exp()[order], "k.", label="reference")
        names = [repr(r["_strings"][i]).strip("'") or "∅" for i in order.tolist()]
        ax.set_xticks(x, names, fontsize=7, rotation=90 if len(order) > 20 else 0)
        ax.set_ylabel("probability")
        ax.set_title(f"{_label(r)}: KL to optimum {_fmt(r['kl_to_own_optimum'])} nats", fontsize=9)
    axes[0, 0].legend(fontsize=8)
    axes[-1, 0].set_xlabel("response (sorted by expert reward, best left; ∅ = empty)")
    return save_figure(fig, path)


def plot_entropy(path: Path, results: list[dict]) -> Path:
    """H(softmax(r/alpha)) over alpha and H(pi_ref exp(r/beta)) over beta, with trained points."""
    r0 = results[0]
    rewards, ref = r0["_rewards"], r0["_ref"]
    grid = torch.logspace(-1.3, 1.3, 101, dtype=torch.float64)
    spo = [seqmodel.entropy(torch.log_softmax(rewards / a, 0)) for a in grid.tolist()]
    dpo = [seqmodel.entropy(torch.log_softmax(ref + rewards / b, 0)) for b in grid.tolist()]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(grid, spo, color="#08519c", label="SPO optimum softmax(r/alpha), x = alpha")
    ax.plot(grid, dpo, color="#a63603", label="DPO optimum pi_ref exp(r/beta), x = beta")
    spo_pts = [(r["alpha"], r["entropy"]) for r in results if r["loss"] == "spo" and not r["beta"]]
    dpo_pts = [(r["beta"], r["entropy"]) for r in results if r["loss"] == "dpo"]
    if spo_pts:
        ax.plot(*zip(*spo_pts), "o", mfc="none", color="#08519c", label="trained SPO (beta=0)")
    if dpo_pts:
        ax.plot(*zip(*dpo_pts), "s", mfc="none", color="#a63603", label="trained DPO")
    ax.axhline(seqmodel.entropy(ref), color="grey", ls="--", label="reference")
    ax.axhline(math.log(len(rewards)), color="grey", ls=":", label="uniform over Y")
    ax.set_xscale("log")
    ax.set_xlabel("alpha (SPO) / beta (DPO)")
    ax.set_ylabel("entropy of the response distribution (nats)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_curves(path: Path, results: list[dict]) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in results:
        pts = [(p["step"], p["kl_to_own_optimum"]) for p in r["_curve"]
               if p["kl_to_own_optimum"] is not None]
        if pts:
            ax.plot(*zip(*pts), label=_label(r))
    ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("exact KL(trained || own predicted optimum), nats")
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def plot_growth(path: Path, rows: list[dict]) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = ["#08519c", "#31a354", "#a63603", "#756bb1"]
    for color, key in zip(colors, dict.fromkeys((r["loss"], r["beta"]) for r in rows)):
        pts = [r for r in rows if (r["loss"], r["beta"]) == key]
        label = f"{key[0]} beta={key[1]:g}"
        left.plot([r["pairs"] for r in pts], [r["entropy"] for r in pts], "o-", color=color,
                  label=label)
        left.axhline(pts[0]["own_optimum_entropy"], color=color, ls=":")
        right.plot([r["pairs"] for r in pts], [r["kl_to_own_optimum"] for r in pts], "o-",
                   color=color, label=label)
    left.axhline(rows[0]["ref_entropy"], color="grey", ls="--", label="reference")
    left.set_ylabel("entropy (nats); dotted: predicted optimum")
    right.set_ylabel("exact KL(trained || own predicted optimum)")
    right.set_yscale("log")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("preference pairs in the data set")
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_drift(path: Path, rows: list[dict]) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    sizes = sorted({r["pairs"] for r in rows})
    methods = list(dict.fromkeys((r["loss"], r["beta"]) for r in rows))
    width = 0.8 / len(methods)
    for i, key in enumerate(methods):
        vals = [next(r["drift_mass"] for r in rows if (r["loss"], r["beta"], r["pairs"]) ==
                     (*key, n)) for n in sizes]
        ax.bar([j + i * width for j in range(len(sizes))], vals, width,
               label=f"{key[0]} beta={key[1]:g}")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))],
                  [f"{n} pairs" for n in sizes])
    ax.set_ylabel("pi(unseen) - pi_ref(unseen)")
    ax.set_title("Probability mass moved onto responses in no training example")
    ax.legend(fontsize=8)
    return save_figure(fig, path)

