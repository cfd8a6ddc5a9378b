"""The labs' commands, `softpo lab tabular` and `softpo lab sequence`: argument parsing and printing.
The labs themselves (`softpo.lab.tabular`, `softpo.lab.sequence`, `softpo.lab.seqreport`) hold none.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


# ------------------------------------------------------------------------------------ lab tabular


def tabular_arguments(parser: argparse.ArgumentParser) -> None:
    """`softpo lab tabular` and its flags."""
    from softpo.lab.tabular import DATA_KINDS, DPO_DEFAULT_BETA, LabConfig

    d = LabConfig()
    a = parser.add_argument
    a("--loss", default=d.loss, help="a registered loss (softpo losses): spo, spo_best_of_n, "
      "spo_ranked, dpo, ipo, ... (default %(default)s)")
    a("--alpha", type=float, default=d.alpha, help="SPO softness; optimum softmax(r/alpha)")
    a("--beta", type=float, default=None, help="SPO: weight of KL(pi||pi_ref) (default 0); "
      f"DPO family: inverse temperature (default {DPO_DEFAULT_BETA})")
    a("--gamma", type=float, default=d.gamma, help="weighted-SPO sharpness (0: unweighted)")
    a("--k", type=int, default=d.k, help="responses per context (default %(default)s)")
    a("--contexts", type=int, default=d.contexts, help="contexts (default %(default)s)")
    a("--n", type=int, default=d.n,
      help="responses per best-of-n / ranked list (default %(default)s)")
    a("--data", choices=DATA_KINDS, default=None, help="data kind (default: the loss's own)")
    a("--sampler", choices=("uniform", "ref"), default=d.sampler,
      help="how responses are drawn: uniformly or from pi_ref (default %(default)s)")
    a("--pairs", type=int, default=d.pairs,
      help="examples to sample (default %(default)s); 0 = train on the exact expected objective")
    a("--steps", type=int, default=d.steps, help="Adam steps (default %(default)s)")
    a("--batch-size", type=int, default=d.batch_size, help="minibatch size (default %(default)s)")
    a("--lr", type=float, default=d.lr,
      help="peak learning rate, cosine to 0 (default %(default)s)")
    a("--seed", type=int, default=d.seed, help="seed of rewards, pi_ref, data and batches")
    a("--reward-scale", type=float, default=d.reward_scale, help="r ~ scale * N(0, 1)")
    a("--target", choices=("auto", "closed", "solver"), default=d.target,
      help="predicted optimum: closed form where known (auto), or the exact-objective solver")
    a("--json", action="store_true", help="print one JSON object and nothing else on stdout")
    a("--out", default="runs/lab_tabular",
      help="folder for plots and report.md (default %(default)s)")
    a("--no-plots", action="store_true", help="write no files")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--table", action="store_true",
                      help="spo, spo_best_of_n, spo_ranked at alpha 0.5/1/2 and dpo (default "
                      "beta), with the data/training flags given: a table and --out/report.md")
    mode.add_argument("--sweep", action="store_true",
                      help="entropy versus alpha (spo) and beta (dpo) at 0.25..4, with the "
                      "data/training flags given: --out/alpha_sweep.png and report.md")


def tabular_command(args: argparse.Namespace) -> int:
    """One tabular run, or the table or sweep; prints a summary or JSON."""
    from softpo.lab.tabular import LabConfig, public, resolve, run, run_sweep, run_table

    cfg = LabConfig(loss=args.loss, alpha=args.alpha, beta=args.beta, gamma=args.gamma, k=args.k,
                    contexts=args.contexts, n=args.n, data=args.data, sampler=args.sampler,
                    pairs=args.pairs, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                    seed=args.seed, reward_scale=args.reward_scale, target=args.target)
    resolve(cfg)  # every bad value fails here, before any work
    out = None if args.no_plots else Path(args.out)
    if args.table or args.sweep:
        rows = (run_table if args.table else run_sweep)(cfg, out, echo=not args.json)
        if args.json:
            print(json.dumps({"runs": rows}))
        return 0
    result = run(cfg)
    if out is not None:
        from softpo.lab import plots

        result["plot"] = str(plots.plot_probs(out / "probs.png", result))
    summary = public(result)
    print(json.dumps(summary) if args.json else format_tabular(summary))
    return 0


def format_tabular(r: dict) -> str:
    """A tabular run's result as the lines `softpo lab tabular` prints."""
    size = "exact expected objective" if r["exact_objective"] else f"{r['pairs']:,} examples"
    target = ("closed form" if r["target"] == "closed"
              else f"solver, |grad| = {r['solver_grad_norm']:.1e}")
    lines = [
        f"softpo lab tabular: {r['loss']} on {r['data']} (n={r['n']}), K={r['k']}, "
        f"{r['contexts']} context(s), alpha={r['alpha']:g}, beta={r['beta']:g}",
        f"  data      {size}, {r['sampler']} sampler, seed {r['seed']}",
        f"  training  Adam {r['steps']} steps x {r['batch_size']}, lr {r['lr']:g}, "
        f"{r['train_seconds']:.1f} s (whole run {r['seconds']:.1f} s)",
        f"  target    {target}",
        f"  KL(pi || target)            {r['kl_to_target']:.5f} nats",
        f"  KL(pi || softmax(r/alpha))  {r['kl_to_spo_target']:.5f} nats",
        *([f"  expected KL from finite data alone: {r['expected_sampling_kl']:.5f} nats"]
          if r["expected_sampling_kl"] is not None else []),
        f"  entropy   learned {r['entropy']:.4f} | target {r['target_entropy']:.4f} | "
        f"pi_ref {r['ref_entropy']:.4f} | uniform {math.log(r['k']):.4f}",
    ]
    if "plot" in r:
        lines.append(f"  plot      {r['plot']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- lab sequence


def sequence_arguments(parser: argparse.ArgumentParser) -> None:
    """`softpo lab sequence` and its flags."""
    from softpo.lab.sequence import DATA_KINDS, DPO_FAMILY_BETA, SeqConfig

    d = SeqConfig()
    a = parser.add_argument
    a("--loss", default=d.loss, help="a registered loss (softpo losses): spo, spo_best_of_n, "
      "spo_ranked, dpo, ipo, simpo, cpo, ... (default %(default)s)")
    a("--alpha", type=float, default=d.alpha, help="SPO softness: the target is softmax(r/alpha)")
    a("--beta", type=float, default=None, help="SPO: weight of the global KL on fresh samples "
      f"(default 0); DPO family: inverse temperature (default {DPO_FAMILY_BETA:g})")
    a("--data", choices=DATA_KINDS, default=None, help="data kind (default: the loss's own)")
    a("--n", type=int, default=d.n,
      help="responses per best-of-n / ranked list (default %(default)s)")
    a("--pairs", type=int, default=d.pairs, help="training examples (default %(default)s)")
    a("--steps", type=int, default=d.steps, help="optimiser steps (default %(default)s)")
    a("--batch-size", type=int, default=d.batch_size,
      help="examples per step (default %(default)s)")
    a("--lr", type=float, default=d.lr,
      help="peak learning rate, cosine to 0 (default %(default)s)")
    a("--warmup-steps", type=int, default=d.warmup_steps,
      help="linear warm-up steps before the cosine decay (default %(default)s)")
    a("--adam-beta2", type=float, default=d.adam_beta2,
      help="Adam's second-moment decay (default %(default)s)")
    a("--estimator", default=d.estimator, help="global-KL estimator: token_sf (default, unbiased), "
      "seq (unbiased) or token (biased)")
    a("--samples", type=int, default=d.samples, help="fresh samples per step (default %(default)s)")
    a("--letters", default=d.letters, help="the alphabet (default %(default)s)")
    a("--max-len", type=int, default=d.max_len, help="longest response (default %(default)s)")
    a("--reward-scale", type=float, default=d.reward_scale, help="r ~ scale * N(0, 1)")
    a("--ref-scale", type=float, default=d.ref_scale, help="p_sft = softmax(scale * N(0, 1))")
    a("--sft-steps", type=int, default=d.sft_steps, help="reference fitting steps")
    a("--eval-every", type=int, default=d.eval_every, help="exact measurement interval")
    a("--seed", type=int, default=d.seed, help="seed of world, models, data and samples")
    a("--json", action="store_true", help="print one JSON object and nothing else on stdout")
    a("--out", default="runs/lab_sequence",
      help="folder for plots and reports (default %(default)s)")
    a("--no-plots", action="store_true", help="write no files")
    a("--report", choices=("table", "seeds", "growth", "growth-large", "drift"), default=None,
      help="run an experiment of docs/lab.md instead of one run: table (SPO at alpha 0.5/1/2 and "
      "the baselines), seeds (SPO at alpha 0.5/1/2 over seeds 0-4), growth (entropy as data "
      "grows), growth-large (the same on |Y| = 341), "
      "drift (mass on unseen responses)")


def sequence_command(args: argparse.Namespace) -> int:
    """One sequence-lab run, or an experiment of docs/lab.md; prints a summary or JSON."""
    from softpo.lab.sequence import SeqConfig, public, resolve, run

    cfg = resolve(SeqConfig(
        loss=args.loss, alpha=args.alpha, beta=args.beta, data=args.data, n=args.n,
        pairs=args.pairs, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        adam_beta2=args.adam_beta2, warmup_steps=args.warmup_steps,
        estimator=args.estimator, samples=args.samples, letters=args.letters,
        max_len=args.max_len, reward_scale=args.reward_scale, ref_scale=args.ref_scale,
        sft_steps=args.sft_steps, eval_every=args.eval_every, seed=args.seed))
    out = None if args.no_plots else Path(args.out)
    if args.report:
        from softpo.lab import seqreport

        rows = seqreport.EXPERIMENTS[args.report](cfg, out, echo=not args.json)
        if args.json:
            print(json.dumps({"runs": rows}))
        return 0
    result = run(cfg)
    if out is not None:
        from softpo.lab import seqreport

        result["plot"] = str(seqreport.plot_run(out / f"{cfg.loss}_probs.png", result))
    summary = public(result)
    print(json.dumps(summary) if args.json else format_sequence(summary))
    return 0


def format_sequence(r: dict) -> str:
    """A sequence-lab run's result as the lines `softpo lab sequence` prints."""
    own = ("n/a" if r["kl_to_own_optimum"] is None
           else f"{r['kl_to_own_optimum']:.5f} nats ({r['own_optimum']}"
           + (f", |grad| {r['solver_grad_norm']:.1e})" if r["solver_grad_norm"] is not None
              else ")"))
    lines = [
        f"softpo lab sequence: {r['loss']} on {r['data']} (n={r['n']}), alpha={r['alpha']:g}, "
        f"beta={r['beta']:g}; |Y|={r['responses']} responses",
        f"  training  {r['pairs']:,} examples, {r['steps']} steps x {r['batch_size']}, "
        f"lr {r['lr']:g}, {r['train_seconds']:.1f} s (run {r['seconds']:.1f} s)",
        f"  KL(pi || softmax(r/alpha))   {r['kl_to_target']:.5f} nats",
        f"  KL(pi || own optimum)        {own}",
        f"  data floor                   {_num(r['data_floor'])} nats (the sampled data's own "
        "optimum against the population one)",
        f"  entropy   learned {r['entropy']:.4f} | softmax(r/alpha) {r['target_entropy']:.4f} | "
        f"pi_ref {r['ref_entropy']:.4f}",
        f"  unseen    {r['unseen_responses']} responses in no example: mass {r['unseen_mass']:.4f} "
        f"(pi_ref {r['unseen_mass_ref']:.4f}, drift {r['drift_mass']:+.4f})",
    ]
    if r["sft_kl"] > 1e-3:
        lines.append(f"  warning   the reference fit stopped at KL(p_sft || pi_ref) {r['sft_kl']:.2g} "
                     "nats (measurements use the fitted model's own distribution; raise --sft-steps "
                     "for a closer fit)")
    if "plot" in r:
        lines.append(f"  plot      {r['plot']}")
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.5f}"
