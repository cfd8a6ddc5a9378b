"""The sequence lab's preference data and each method's predicted optimum over the response set Y.

With one prompt, a distribution over Y is one row of the tabular lab's problems (C = 1 context,
K = |Y| responses), so data are drawn by `softpo.lab.optima` from the reference model's exact
distribution: n distinct responses drawn from pi_ref (sequentially, renormalised after each), then
ordered by the expert: Bradley-Terry pairs, a Luce winner (best-of-n) or a Plackett-Luce ranking
with weights exp(r(y)).

Predicted optima (what each loss converges to with unlimited data)
-------------------------------------------------------------------
    SPO family, beta = 0     softmax(r / alpha)                  independent of pi_ref
    DPO                      pi_ref exp(r / beta), normalised
    H-DPO                    (pi_ref exp(r / beta))^(1/alpha), normalised
    anything else            argmin over pi of the exact expected objective
                                 J(pi) = E_data[ l(pi; example) ] + [SPO: beta KL(pi || pi_ref)],
                             the expectation summed over every possible example with its
                             probability; found by L-BFGS on the logits in float64.
Unlike the tabular lab's solver this one passes each response's true token count (letters, plus
<eos> below the length cap), which the length-normalised losses (IPO, SimPO, CPO's NLL) read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from softpo.lab import optima
from softpo.lab.optima import Examples, Problem
from softpo.losses import ListLogps, LossParams, LossSpec

DTYPE = torch.float64


def problem(rewards: Tensor, ref_logps: Tensor) -> Problem:
    """The tabular view: one context, K = |Y| responses."""
    return Problem(rewards[None].to(DTYPE), ref_logps[None].to(DTYPE))


def sample_data(rewards: Tensor, ref_logps: Tensor, kind: str, count: int, n: int,
                seed: int) -> Examples:
    """`count` examples with responses drawn from pi_ref, in preference order (column 0 best)."""
    return optima.sample_data(problem(rewards, ref_logps), kind, count, n, "ref", seed)


def seen(data: Examples, size: int) -> Tensor:
    """(Y,) bool: the responses that appear in at least one example."""
    mask = torch.zeros(size, dtype=torch.bool)
    mask[data.resp.flatten()] = True
    return mask


@dataclass
class Optimum:
    """A loss's predicted optimum over Y: closed form, solver, or why it is missing."""

    logps: Tensor | None  # (Y,) log-probs, None where it could not be computed
    how: str  # "closed" | "solver" | reason it is missing
    grad_norm: float | None = None


def predicted_optimum(spec: LossSpec, params: LossParams, kind: str, n: int, rewards: Tensor,
                      ref_logps: Tensor, lengths: Tensor) -> Optimum:
    """The optimum the loss should reach on this world: closed form where known, else solved."""
    prob = problem(rewards, ref_logps)
    if spec.is_spo and params.beta == 0:
        return Optimum(optima.spo_optimum(prob, params.alpha)[0], "closed")
    if spec.name == "dpo":
        return Optimum(optima.dpo_optimum(prob, params.beta)[0], "closed")
    if spec.name == "hdpo":
        return Optimum(optima.hdpo_optimum(prob, params.alpha, params.beta)[0], "closed")
    if optima.enumerated_size(prob, kind, n) > optima.MAX_ENUMERATED:
        return Optimum(None, "too many examples to enumerate")
    data = optima.enumerate_data(prob, kind, n, "ref")
    init = optima.spo_optimum(prob, params.alpha)[0] if spec.is_spo else ref_logps.to(DTYPE)
    return solve(spec, params, data, ref_logps.to(DTYPE), lengths.to(DTYPE), init)


def objective(theta: Tensor, spec: LossSpec, params: LossParams, data: Examples, ref_logps: Tensor,
              lengths: Tensor) -> Tensor:
    """J(softmax(theta)): the weighted mean loss over `data`, + beta KL(pi || pi_ref) for SPO."""
    logp = torch.log_softmax(theta, 0)  # (Y,)
    lp = ListLogps(logp[data.resp], lengths[data.resp], ref_logps=ref_logps[data.resp])
    value = (data.weight * spec.fn(lp, params).losses).sum()
    if spec.is_spo and params.beta > 0:
        value = value + params.beta * (logp.exp() * (logp - ref_logps)).sum()
    return value


def solve(spec: LossSpec, params: LossParams, data: Examples, ref_logps: Tensor, lengths: Tensor,
          init: Tensor, tol: float = 1e-9, rounds: int = 20) -> Optimum:
    """L-BFGS (strong Wolfe line search) on the logits until |grad J| < tol."""
    theta = init.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=500, history_size=50, tolerance_grad=tol,
                            tolerance_change=1e-16, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = objective(theta, spec, params, data, ref_logps, lengths)
        value.backward()
        return value

    for _ in range(rounds):
        opt.step(closure)
        closure()
        if theta.grad.norm() < tol:
            break
    closure()
    return Optimum(torch.log_softmax(theta.detach(), 0), "solver", theta.grad.norm().item())
