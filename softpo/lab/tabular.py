"""`softpo lab tabular`: a categorical policy trained on expert preferences, measured exactly.

A table of logits theta (C contexts x K responses) starts at pi_ref and is trained by minibatch Adam
on preference data sampled from a known expert reward r (Bradley-Terry pairs, Luce best-of-n or
Plackett-Luce rankings; see `softpo.lab.optima`), through the registered loss functions. Because
everything is enumerable, the lab reports the exact KL(pi_theta || pi*) to the predicted optimum:
    SPO, beta = 0    pi* = softmax(r / alpha)               (independent of pi_ref)
    DPO              pi* ∝ pi_ref exp(r / beta)
    H-DPO            pi* ∝ (pi_ref exp(r / beta))^(1/alpha)
    anything else    the minimiser of the exact expected objective, by a deterministic solver
                     (`--target solver` forces it, so that closed form and solver can be compared).
`--pairs 0` trains on the exact expected objective instead of a sample (full-batch Adam).
The KL regulariser of the SPO family, beta * KL(pi_theta || pi_ref), is computed exactly.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from softpo.errors import UserError
from softpo.lab import one_thread, optima
from softpo.lab.optima import Examples, Problem
from softpo.losses import LOSSES, LossParams, LossSpec, get_loss

DATA_KINDS = ("pairs", "best_of_n", "ranked")
# data a loss can read, by the kind it is registered with: a ranked list carries a Luce winner
# (column 0), and pairs are lists of two; a pair loss needs exactly two responses.
READABLE = {"pairs": ("pairs",), "best_of_n": DATA_KINDS, "ranked": ("pairs", "ranked")}
SOLVER_WARN = 1e-8  # solver gradient norm above which its optimum is reported as unconverged
DPO_DEFAULT_BETA = 1.0  # r ~ N(0, 1): beta = 1 puts DPO's optimum on the scale of SPO's alpha = 1


@dataclass(frozen=True)
class LabConfig:
    """One tabular run (the flags of `softpo lab tabular`)."""

    loss: str = "spo"
    alpha: float = 1.0
    beta: float | None = None  # None: 0 for the SPO family, DPO_DEFAULT_BETA otherwise
    gamma: float = 0.0  # weighted SPO
    k: int = 16
    contexts: int = 1
    n: int = 4  # responses per list for best_of_n / ranked data
    data: str | None = None  # None: the loss's own kind
    sampler: str = "uniform"
    pairs: int = 100_000  # examples; 0 = the exact expected objective
    steps: int = 1000
    batch_size: int = 1000
    lr: float = 0.05
    seed: int = 0
    reward_scale: float = 1.0
    target: str = "auto"  # auto | closed | solver


def resolve(cfg: LabConfig) -> tuple[LabConfig, LossSpec]:
    """Fill the defaults that depend on the loss and check every value; UserError if bad."""
    if cfg.loss not in LOSSES:
        raise UserError(f"unknown loss '{cfg.loss}' (known: {', '.join(sorted(LOSSES))})")
    spec = get_loss(cfg.loss)
    beta = cfg.beta if cfg.beta is not None else (0.0 if spec.is_spo else DPO_DEFAULT_BETA)
    cfg = replace(cfg, beta=beta, data=cfg.data or spec.data_kind)
    checks = [
        (math.isfinite(cfg.alpha) and cfg.alpha > 0, f"--alpha must be > 0 (got {cfg.alpha})"),
        (math.isfinite(beta) and beta >= 0, f"--beta must be >= 0 (got {beta})"),
        (spec.is_spo or beta > 0, f"--beta must be > 0 for '{cfg.loss}' (got {beta})"),
        (cfg.k >= 2, f"--k must be >= 2 (got {cfg.k})"),
        (cfg.contexts >= 1, f"--contexts must be >= 1 (got {cfg.contexts})"),
        (2 <= cfg.n <= cfg.k, f"--n must be between 2 and --k={cfg.k} (got {cfg.n})"),
        (cfg.data in READABLE[spec.data_kind],
         f"loss '{cfg.loss}' reads {spec.data_kind} data; it cannot learn from --data {cfg.data}"),
        (cfg.pairs >= 0, f"--pairs must be >= 0 (got {cfg.pairs})"),
        (cfg.steps >= 1, f"--steps must be >= 1 (got {cfg.steps})"),
        (cfg.batch_size >= 1, f"--batch-size must be >= 1 (got {cfg.batch_size})"),
        (math.isfinite(cfg.lr) and cfg.lr > 0, f"--lr must be > 0 (got {cfg.lr})"),
        (math.isfinite(cfg.gamma) and cfg.gamma >= 0, f"--gamma must be >= 0 (got {cfg.gamma})"),
        (math.isfinite(cfg.reward_scale) and cfg.reward_scale > 0,
         f"--reward-scale must be > 0 (got {cfg.reward_scale})"),
    ]
    if cfg.target == "closed" and not optima.has_closed_form(cfg.loss, cfg.alpha, beta):
        checks.append((False, f"no closed-form optimum for '{cfg.loss}' at beta={beta}; "
                              "use --target auto or solver"))
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    return cfg, spec


def loss_params(cfg: LabConfig) -> LossParams:
    """The loss hyper-parameters of a run."""
    return LossParams(alpha=cfg.alpha, beta=cfg.beta, gamma=cfg.gamma)


# ----------------------------------------------------------------------------------------- training


def batches(data: Examples, batch_size: int, steps: int, seed: int):
    """`steps` minibatches from shuffled epochs; the whole set each step if it fits."""
    if batch_size >= len(data):
        for _ in range(steps):
            yield data
        return
    gen = torch.Generator().manual_seed(seed)
    epoch, at = data.subset(torch.randperm(len(data), generator=gen)), 0  # shuffled once an epoch
    for _ in range(steps):
        if at + batch_size > len(data):
            epoch, at = data.subset(torch.randperm(len(data), generator=gen)), 0
        yield epoch.subset(slice(at, at + batch_size))
        at += batch_size


def train(problem: Problem, data: Examples, spec: LossSpec, cfg: LabConfig) -> Tensor:
    """Adam on the logits from pi_ref, learning rate on a cosine from cfg.lr to 0; log-probs out."""
    theta = problem.ref_logps.clone().requires_grad_(True)  # (C, K)
    opt = torch.optim.Adam([theta], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / cfg.steps)))
    params, kw = loss_params(cfg), optima.kl_weight(spec, cfg.beta)
    for batch in batches(data, cfg.batch_size, cfg.steps, cfg.seed + 1):
        loss = optima.objective(theta, problem, batch, spec, params, kw)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return torch.log_softmax(theta.detach(), -1)


def predicted_optimum(problem: Problem, spec: LossSpec, cfg: LabConfig,
                      exact: Examples | None = None) -> tuple[Tensor, str, float | None]:
    """(log-probs (C, K), how it was found, solver gradient norm or None)."""
    closed = optima.closed_form(spec.name, problem, cfg.alpha, cfg.beta)
    if closed is not None and cfg.target != "solver":
        return closed, "closed", None
    if exact is None:
        exact = optima.enumerate_data(problem, cfg.data, cfg.n, cfg.sampler)
    init = optima.spo_optimum(problem, cfg.alpha) if spec.is_spo else None
    sol = optima.solve(problem, exact, spec, loss_params(cfg), cfg.beta, init=init)
    if sol.grad_norm > SOLVER_WARN:
        print(f"softpo: warning: the solver stopped at |grad| = {sol.grad_norm:.1e} ('{spec.name}' "
              "may be non-smooth); kl_to_target is to its last iterate", file=sys.stderr)
    return sol.logps, "solver", sol.grad_norm


def run(cfg: LabConfig) -> dict:
    """One lab run: sample (or enumerate) data, train, compare with the predicted optimum.

    Returns the JSON-able summary plus `_policy`, `_target`, `_problem` for plotting.
    """
    with one_thread():
        return _run(*resolve(cfg))


def _run(cfg: LabConfig, spec: LossSpec) -> dict:
    start = time.perf_counter()
    problem = optima.make_problem(cfg.contexts, cfg.k, cfg.seed, cfg.reward_scale)
    exact = None  # the whole data distribution, where it is small enough to list
    if cfg.pairs == 0 or optima.enumerated_size(problem, cfg.data, cfg.n) <= optima.MAX_ENUMERATED:
        exact = optima.enumerate_data(problem, cfg.data, cfg.n, cfg.sampler)
    data = exact if cfg.pairs == 0 else optima.sample_data(problem, cfg.data, cfg.pairs, cfg.n,
                                                            cfg.sampler, cfg.seed)
    train_start = time.perf_counter()
    policy = train(problem, data, spec, cfg)
    train_seconds = time.perf_counter() - train_start
    target, how, grad_norm = predicted_optimum(problem, spec, cfg, exact)
    spo_target = optima.spo_optimum(problem, cfg.alpha)
    sampling_kl = None
    if cfg.pairs > 0 and exact is not None:
        sampling_kl = optima.sampling_kl(problem, exact, spec, loss_params(cfg), cfg.beta, target,
                                         cfg.pairs)
    mean = lambda t: t.mean().item()  # noqa: E731  (average over contexts)
    result = {
        "loss": cfg.loss, "alpha": cfg.alpha, "beta": cfg.beta, "k": cfg.k,
        "kl_to_target": mean(optima.kl(policy, target)),
        "entropy": mean(optima.entropy(policy)),
        "target_entropy": mean(optima.entropy(target)),
        "kl_to_spo_target": mean(optima.kl(policy, spo_target)),
        "spo_target_entropy": mean(optima.entropy(spo_target)),
        "ref_entropy": mean(optima.entropy(problem.ref_logps)),
        "kl_to_ref": mean(optima.kl(policy, problem.ref_logps)),
        "expected_reward": mean((policy.exp() * problem.rewards).sum(-1)),
        "target_expected_reward": mean((target.exp() * problem.rewards).sum(-1)),
        "expected_sampling_kl": sampling_kl,
        "target": how, "solver_grad_norm": grad_norm,
        "data": cfg.data, "n": optima.list_size(cfg.data, cfg.n), "sampler": cfg.sampler,
        "pairs": cfg.pairs, "exact_objective": cfg.pairs == 0, "contexts": cfg.contexts,
        "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "gamma": cfg.gamma,
        "reward_scale": cfg.reward_scale, "seed": cfg.seed,
        "train_seconds": round(train_seconds, 3), "seconds": round(time.perf_counter() - start, 3),
    }
    return result | {"_policy": policy, "_target": target, "_problem": problem}


def public(result: dict) -> dict:
    """A result without its tensors (the keys starting with `_`)."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


# ------------------------------------------------------------------------------------ table & sweep

TABLE_RUNS = [(name, a) for name in ("spo", "spo_best_of_n", "spo_ranked") for a in (0.5, 1.0, 2.0)]
TABLE_RUNS += [("dpo", 1.0)]
TABLE_COLUMNS = ("loss", "data", "alpha", "beta", "kl_to_target", "expected_sampling_kl", "entropy",
                 "target_entropy", "train_seconds")


def run_table(base: LabConfig = LabConfig(), out: str | Path | None = None,
              echo: bool = True) -> list[dict]:
    """SPO (pairs, best-of-n, ranked) at alpha in {0.5, 1, 2} and DPO, each against its optimum."""
    rows = [public(run(replace(base, loss=name, alpha=alpha, beta=None, data=None)))
            for name, alpha in TABLE_RUNS]
    from softpo.lab import plots

    table = plots.markdown_table(_shown(rows), TABLE_COLUMNS)
    if echo:
        print(table)
    if out is not None:
        plots.write_report(Path(out) / "report.md", "softpo tabular lab: distance to the predicted "
                           "optimum", _setup_line(base), table)
    return rows


def _shown(rows: list[dict]) -> list[dict]:
    """Rows for a table: alpha blanked where the loss does not read it."""
    return [r if get_loss(r["loss"]).is_spo else r | {"alpha": None} for r in rows]


def _setup_line(cfg: LabConfig) -> str:
    size = "the exact expected objective" if cfg.pairs == 0 else f"{cfg.pairs:,} sampled examples"
    return (f"K={cfg.k} responses, {cfg.contexts} context(s), r ~ {cfg.reward_scale} * N(0, 1), "
            f"{size} ({cfg.sampler} sampler, lists of n={cfg.n} for best-of-n/ranked), Adam "
            f"{cfg.steps} steps x {cfg.batch_size}, lr {cfg.lr} (cosine), seed {cfg.seed}. "
            "kl_to_target = KL(pi_trained || pi*) in nats, averaged over contexts.")


SWEEP_KNOBS = (0.25, 0.5, 1.0, 2.0, 4.0)


def run_sweep(base: LabConfig, out: str | Path | None, echo: bool = True) -> list[dict]:
    """Entropy of SPO's optimum over alpha against DPO's over beta, with trained points."""
    from softpo.lab import plots

    rows = [public(run(replace(base, loss="spo", alpha=x, beta=0.0, data=None)))
            for x in SWEEP_KNOBS]
    rows += [public(run(replace(base, loss="dpo", beta=x, data=None))) for x in SWEEP_KNOBS]
    columns = ("loss", "alpha", "beta", "entropy", "target_entropy", "kl_to_target")
    table = plots.markdown_table(_shown(rows), columns)
    if echo:
        print(table)
    if out is not None:
        problem = optima.make_problem(base.contexts, base.k, base.seed, base.reward_scale)
        plots.plot_sweep(Path(out) / "alpha_sweep.png", problem, rows)
        plots.write_report(Path(out) / "report.md", "softpo tabular lab: entropy versus alpha "
                           "(SPO) and beta (DPO)", _setup_line(base), table,
                           images=["alpha_sweep.png"])
    return rows
