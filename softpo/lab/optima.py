"""Tabular problems: their preference data, the exact expected objective, and its optimum.

Problem
-------
C contexts x with K responses y each. The expert reward r(x, y) and the reference policy
pi_ref(y|x) = softmax(ref_logits[x]) are fixed by the seed. The policy is a table of logits theta
(C, K) with pi_theta(.|x) = softmax(theta[x]); its summed "sequence" log-prob is log pi_theta(y|x),
one token long.

Data
----
A context x ~ uniform; a set S of n distinct responses drawn without replacement, uniformly or from
pi_ref (sequential draws, renormalised after each); the expert then orders S by Plackett-Luce with
weights exp(r(x, .)):
    pairs      n = 2, P(a > b) = sigmoid(r_a - r_b)                    (Bradley-Terry)
    best_of_n  a winner w in S with P(w) = softmax(r_S)[w], the rest unordered       (Luce)
    ranked     a permutation t of S, P(t) = prod_k exp(r_tk) / sum_{j>=k} exp(r_tj)  (Plackett-Luce)
Every example is stored in preference order (column 0 best), which is how the losses read it.
`sample_data` draws N examples; `enumerate_data` lists every possible example with its probability,
so that a weighted sum over it is an exact expectation.

Objective
---------
    J(theta) = E_data[ l(theta; example) ] + beta * E_x KL( pi_theta(.|x) || pi_ref(.|x) )
where l is a registered loss (never re-implemented here) and the KL term is present for the SPO
family only (the DPO family carries beta inside l). On enumerated data J is exact; `solve`
minimises it by damped Newton in float64.

Predicted optima (DESIGN.md section 1.2)
----------------------------------------
* SPO, beta = 0: the pair loss depends on theta only through d = theta_a - theta_b, and
      E[l | {a, b}] = -(1/alpha) [p log sigmoid(alpha d) + (1 - p) log sigmoid(-alpha d)]
  with p = sigmoid(r_a - r_b), a cross-entropy minimised at sigmoid(alpha d) = p, i.e.
  alpha d = r_a - r_b, for every pair at once:
  theta = r / alpha + const, pi* = softmax(r / alpha), whatever pi_ref is. The best-of-n and ranked
  losses are cross-entropies between Luce / Plackett-Luce models with weights pi^alpha and exp(r),
  minimised at the same point.
* DPO: the same argument with d = beta (h_a - h_b), h = log pi/pi_ref, gives
  pi* ∝ pi_ref exp(r / beta).
* H-DPO: d = beta (alpha (theta_a - theta_b) - (ref_a - ref_b)) = r_a - r_b gives
  pi* ∝ (pi_ref exp(r / beta))^(1/alpha).
* Anything else (SPO with beta > 0, IPO, hinge, ...): no closed form here; `solve` finds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations, permutations
from math import comb, factorial
from typing import Callable

import torch
from torch import Tensor

from softpo.errors import UserError
from softpo.losses import ListLogps, LossParams, LossSpec

MAX_ENUMERATED = 2_000_000  # examples an exact objective may list
DTYPE = torch.float64


@dataclass(frozen=True)
class Problem:
    """Contexts x responses: the expert reward and the reference distribution."""

    rewards: Tensor  # (C, K) expert reward r(x, y)
    ref_logps: Tensor  # (C, K) log pi_ref(y|x), normalised

    @property
    def contexts(self) -> int:
        """C, the number of contexts."""
        return self.rewards.shape[0]

    @property
    def k(self) -> int:
        """K, the responses per context."""
        return self.rewards.shape[1]


def make_problem(contexts: int, k: int, seed: int, reward_scale: float = 1.0,
                 ref_scale: float = 1.0) -> Problem:
    """r ~ reward_scale * N(0, 1) and pi_ref = softmax(ref_scale * N(0, 1)), independent draws."""
    gen = torch.Generator().manual_seed(seed)
    rewards = reward_scale * torch.randn(contexts, k, generator=gen, dtype=DTYPE)
    ref_logits = ref_scale * torch.randn(contexts, k, generator=gen, dtype=DTYPE)
    return Problem(rewards, torch.log_softmax(ref_logits, -1))


@dataclass
class Examples:
    """Preference examples, sampled or enumerated with their probabilities."""

    ctx: Tensor  # (N,) context of each example
    resp: Tensor  # (N, n) responses in preference order, column 0 best
    weight: Tensor  # (N,) probability of each example; sums to 1

    def __len__(self) -> int:
        return self.ctx.shape[0]

    def subset(self, idx: Tensor | slice) -> "Examples":
        """The examples at idx, weights renormalised to sum to 1."""
        weight = self.weight[idx]
        return Examples(self.ctx[idx], self.resp[idx], weight / weight.sum())


def list_size(kind: str, n: int) -> int:
    """Responses per example: 2 for pairs, n for best-of-n and ranked lists."""
    return 2 if kind == "pairs" else n


# ------------------------------------------------------------------------------------------ sampled


def sample_data(problem: Problem, kind: str, count: int, n: int, sampler: str,
                seed: int) -> Examples:
    """Draw `count` examples; ordering S by r + Gumbel noise is an exact Plackett-Luce draw."""
    gen = torch.Generator().manual_seed(seed)
    n = list_size(kind, n)
    ctx = torch.randint(problem.contexts, (count,), generator=gen)  # (N,)
    if sampler == "uniform":
        sets = torch.rand(count, problem.k, generator=gen).argsort(-1)[:, :n]  # (N, n)
    else:
        sets = torch.multinomial(problem.ref_logps.exp()[ctx], n, replacement=False, generator=gen)
    u = torch.rand(count, n, generator=gen, dtype=DTYPE).clamp_min(1e-300)
    noisy = problem.rewards[ctx[:, None], sets] - torch.log(-torch.log(u))  # (N, n) r + Gumbel
    ranked = sets.gather(1, noisy.argsort(-1, descending=True))  # (N, n) a Plackett-Luce draw
    if kind == "best_of_n":  # the winner first, the others in the order they were drawn
        winner = ranked[:, :1]
        ranked = torch.cat([winner, sets[sets != winner].view(count, n - 1)], 1)
    return Examples(ctx, ranked, torch.full((count,), 1.0 / count, dtype=DTYPE))


# --------------------------------------------------------------------------------------- enumerated


def enumerated_size(problem: Problem, kind: str, n: int) -> int:
    """How many distinct examples the exact expected objective enumerates."""
    n = list_size(kind, n)
    outcomes = n if kind == "best_of_n" else factorial(n)
    return problem.contexts * comb(problem.k, n) * outcomes


def enumerate_data(problem: Problem, kind: str, n: int, sampler: str) -> Examples:
    """Every possible example with its exact probability (weights sum to 1)."""
    size = enumerated_size(problem, kind, n)
    if size > MAX_ENUMERATED:
        raise UserError(f"the exact objective would list {size:,} examples (limit "
                        f"{MAX_ENUMERATED:,}); use fewer responses (--k, --n) or sampled data")
    n = list_size(kind, n)
    sets = torch.tensor(list(combinations(range(problem.k), n)))  # (M, n)
    if kind == "best_of_n":  # outcome w: [s_w, the others in set order]
        outcomes = torch.tensor([[w] + [j for j in range(n) if j != w] for w in range(n)])
    else:  # every ordering of the set
        outcomes = torch.tensor(list(permutations(range(n))))  # (P, n)
    resp = sets[:, outcomes]  # (M, P, n) examples in preference order
    parts = [_context_examples(problem, c, sets, resp, kind, sampler)
             for c in range(problem.contexts)]
    return Examples(*(torch.cat(t) for t in zip(*parts)))


def _context_examples(problem: Problem, c: int, sets: Tensor, resp: Tensor, kind: str,
                      sampler: str) -> tuple[Tensor, Tensor, Tensor]:
    r = problem.rewards[c]  # (K,)
    set_logp = _set_logprob(problem.ref_logps[c], sets, sampler)  # (M,)
    if kind == "best_of_n":  # Luce: P(winner) = softmax over the set
        outcome_logp = torch.log_softmax(r[sets], -1)  # (M, n); outcome w has winner s_w
    else:  # Plackett-Luce: sum_k r_tk - logsumexp_{j>=k} r_tj
        rr = r[resp]  # (M, P, n)
        outcome_logp = (rr - torch.logcumsumexp(rr.flip(-1), -1).flip(-1)).sum(-1)  # (M, P)
    weight = (set_logp[:, None] + outcome_logp).exp().flatten() / problem.contexts
    flat = resp.flatten(0, 1)  # (M*P, n)
    return torch.full((flat.shape[0],), c), flat, weight


def _set_logprob(ref_logps: Tensor, sets: Tensor, sampler: str) -> Tensor:
    """log P(S): uniform, or the sum over draw orders of prod_i p_i / (1 - sum_{j<i} p_j)."""
    m, n = sets.shape
    if sampler == "uniform":
        return torch.full((m,), -math.log(comb(ref_logps.shape[0], n)), dtype=DTYPE)
    orders = sets[:, torch.tensor(list(permutations(range(n))))]  # (M, P, n)
    p = ref_logps.exp()[orders]  # (M, P, n)
    drawn_before = torch.cumsum(p, -1) - p  # (M, P, n)
    logp = (p.log() - torch.log1p(-drawn_before)).sum(-1)  # (M, P)
    return torch.logsumexp(logp, -1)


# ---------------------------------------------------------------------------------------- objective


def kl(logps: Tensor, other_logps: Tensor) -> Tensor:
    """KL(p || q) per context, from normalised log-probs (C, K) -> (C,)."""
    return (logps.exp() * (logps - other_logps)).sum(-1)


def entropy(logps: Tensor) -> Tensor:
    """H(p) per context (C, K) -> (C,)."""
    return -(logps.exp() * logps).sum(-1)


def list_logps(logits: Tensor, problem: Problem, data: Examples,
               with_ref: bool = True) -> ListLogps:
    """The examples as the losses read them: each response is one token, log pi(y|x) its logp."""
    logp = torch.log_softmax(logits, -1)  # (C, K)
    rows = data.ctx[:, None]  # (N, 1)
    policy_logps = logp[rows, data.resp]  # (N, n)
    return ListLogps(policy_logps=policy_logps, lengths=torch.ones_like(policy_logps),
                     ref_logps=problem.ref_logps[rows, data.resp] if with_ref else None)


def objective(logits: Tensor, problem: Problem, data: Examples, spec: LossSpec,
              params: LossParams, kl_coef: float) -> Tensor:
    """sum_i weight_i * l_i + kl_coef * mean_x KL(pi_theta || pi_ref); exact on enumerated data."""
    out = spec.fn(list_logps(logits, problem, data, spec.needs_ref), params)
    value = (data.weight * out.losses).sum()
    if kl_coef:
        value = value + kl_coef * kl(torch.log_softmax(logits, -1), problem.ref_logps).mean()
    return value


def kl_weight(spec: LossSpec, beta: float) -> float:
    """The global KL regulariser applies to the SPO family; DPO-family losses read beta inside."""
    return beta if spec.is_spo else 0.0


# ------------------------------------------------------------------------------------------- optima


def spo_optimum(problem: Problem, alpha: float) -> Tensor:
    """log softmax(r / alpha): SPO's optimum at beta = 0, for any pi_ref."""
    return torch.log_softmax(problem.rewards / alpha, -1)


def dpo_optimum(problem: Problem, beta: float) -> Tensor:
    """log of pi_ref * exp(r / beta), normalised: DPO's optimum under Bradley-Terry."""
    return torch.log_softmax(problem.ref_logps + problem.rewards / beta, -1)


def hdpo_optimum(problem: Problem, alpha: float, beta: float) -> Tensor:
    """log of (pi_ref * exp(r / beta))^(1/alpha), normalised: H-DPO's optimum under Bradley-Terry."""
    return torch.log_softmax((problem.ref_logps + problem.rewards / beta) / alpha, -1)


def _spo_closed(problem: Problem, alpha: float, beta: float) -> Tensor | None:
    return spo_optimum(problem, alpha) if beta == 0 else None


CLOSED_FORMS: dict[str, Callable[[Problem, float, float], Tensor | None]] = {
    "spo": _spo_closed,
    "spo_best_of_n": _spo_closed,
    "spo_ranked": _spo_closed,
    "dpo": lambda problem, alpha, beta: dpo_optimum(problem, beta),
    "hdpo": hdpo_optimum,
}


def closed_form(name: str, problem: Problem, alpha: float, beta: float) -> Tensor | None:
    """The predicted optimum's log-probs (C, K), or None where no closed form is known."""
    fn = CLOSED_FORMS.get(name)
    return None if fn is None else fn(problem, alpha, beta)


def has_closed_form(name: str, alpha: float, beta: float) -> bool:
    """Whether the loss's optimum has a closed form at these alpha, beta."""
    return closed_form(name, make_problem(1, 2, 0), alpha, beta) is not None


@dataclass
class Solution:
    """The minimiser of an exact objective, found by the solver."""

    logps: Tensor  # (C, K) normalised log-probs of the minimiser
    grad_norm: float  # |grad J| at it
    iterations: int


def solve(problem: Problem, data: Examples, spec: LossSpec, params: LossParams, beta: float,
          init: Tensor | None = None, tol: float = 1e-10, max_iter: int = 200) -> Solution:
    """Minimise J over the logits by Levenberg-Marquardt damped Newton in float64.

    Step s = -(H + lam I)^-1 g, accepted when J does not increase (then lam /= 10, else lam *= 10),
    until |g| < tol. J is invariant to a per-context shift of the logits, so H is singular along
    those directions; g is orthogonal to them and the damping keeps the step finite. Non-convex
    objectives (SPO's KL term) are handled by the damping: a rejected step raises lam toward a
    gradient step.
    """
    shape, f = problem.rewards.shape, _flat_objective(problem, data, spec, params, beta)
    theta = (problem.ref_logps if init is None else init).detach().clone().flatten()
    lam, eye = 1e-6, torch.eye(theta.numel(), dtype=DTYPE)
    for it in range(max_iter):
        value, grad = _value_and_grad(f, theta)
        if grad.norm() < tol:
            break
        hess = torch.autograd.functional.hessian(f, theta)  # (CK, CK)
        while lam < 1e12:
            step = torch.linalg.solve(hess + lam * eye, -grad)
            new = f(theta + step).item()
            if new <= value + 1e-14 * (1 + abs(value)):
                theta, lam = theta + step, max(lam / 10, 1e-12)
                break
            lam *= 10
        else:
            break
    value, grad = _value_and_grad(f, theta)
    logps = torch.log_softmax(theta.view(shape), -1)
    return Solution(logps, grad.norm().item(), it)


def sampling_kl(problem: Problem, data: Examples, spec: LossSpec, params: LossParams, beta: float,
                optimum: Tensor, count: int) -> float | None:
    """Expected KL(pi_hat || pi*) of the minimiser pi_hat of the objective on `count` sampled
    examples, to first order in 1/count: the data's share of the lab's error; training adds its own.

    M-estimation: theta_hat - theta* = -H^+ g_N + o(1/sqrt(N)), where g_N is the mean of N i.i.d.
    per-example gradients (mean g_bar, covariance V/N, V = E[g g^T] - g_bar g_bar^T; the KL term is
    exact, not sampled) and H the Hessian of J at theta*. To second order
    KL(pi_hat || pi*) = 1/2 d^T F d with F = (1/C) blockdiag_x(diag pi_x - pi_x pi_x^T) (the softmax
    Fisher matrix), so E KL = tr(F H^+ V H^+) / (2N). `data` must be the enumerated distribution.
    None where H is singular beyond the per-context shifts (e.g. the piecewise-linear hinge loss):
    there the expansion does not hold.
    """
    grads = _example_grads(problem, data, spec, params, optimum)  # (N, C*K)
    mean = data.weight @ grads  # (C*K,)
    cov = (grads * data.weight[:, None]).T @ grads - torch.outer(mean, mean)
    hess = torch.autograd.functional.hessian(
        _flat_objective(problem, data, spec, params, beta), optimum.flatten())
    evals = torch.linalg.eigvalsh(hess)
    if (evals > 1e-9 * evals.abs().max()).sum() < problem.contexts * (problem.k - 1):
        return None
    h_pinv = torch.linalg.pinv(hess, hermitian=True, rtol=1e-10)
    pi = optimum.exp()  # (C, K)
    fisher = torch.block_diag(*(torch.diag(p) - torch.outer(p, p) for p in pi)) / problem.contexts
    return (torch.trace(fisher @ h_pinv @ cov @ h_pinv) / (2 * count)).item()


def _example_grads(problem: Problem, data: Examples, spec: LossSpec, params: LossParams,
                   logps: Tensor) -> Tensor:
    """Per-example gradients of the loss w.r.t. the logits (N, C*K), at log-probs `logps`.

    Loss i reads only row i of policy_logps, so one backward pass of sum_i l_i w.r.t. policy_logps
    (N, n) gives every example's own dl_i/dlogp_ij; then dlogp(y|x)/dtheta_x = e_y - pi_x.
    """
    lp = list_logps(logps, problem, data, spec.needs_ref)
    lp.policy_logps = lp.policy_logps.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(spec.fn(lp, params).losses.sum(), lp.policy_logps)  # (N, n)
    c, k = problem.contexts, problem.k
    grads = torch.zeros(len(data), c, k, dtype=DTYPE)
    rows = torch.arange(len(data))[:, None]
    grads[rows, data.ctx[:, None], data.resp] += g  # sum_j g_ij e_{y_ij}
    grads[torch.arange(len(data)), data.ctx] -= g.sum(-1, keepdim=True) * logps.exp()[data.ctx]
    return grads.flatten(1)


def _flat_objective(problem: Problem, data: Examples, spec: LossSpec, params: LossParams,
                    beta: float) -> Callable[[Tensor], Tensor]:
    shape, kw = problem.rewards.shape, kl_weight(spec, beta)
    return lambda theta: objective(theta.view(shape), problem, data, spec, params, kw)


def _value_and_grad(f: Callable[[Tensor], Tensor], theta: Tensor) -> tuple[float, Tensor]:
    theta = theta.detach().requires_grad_(True)
    value = f(theta)
    (grad,) = torch.autograd.grad(value, theta)
    return value.item(), grad.detach()
