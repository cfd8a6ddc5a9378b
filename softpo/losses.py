"""Pure maths: every preference loss, the SPO weighting mu, and the global-KL estimators.

Tensors in (summed log-probs per response, token log-probs of samples, masks), per-example losses and
detached statistics out. No models, no config, no logging. A registry maps a name to a function.

Conventions
-----------
* `logp(y|x) = sum_t log pi(y_t | x, y_<t)` over response tokens only.
* Responses of one example are stored in *preference order*: column 0 is the most preferred.
  pairs: n = 2 (chosen, rejected); best_of_n: column 0 is the winner, the others unordered;
  ranked: columns in rank order (Plackett-Luce). Padding responses have `mask == False`.
* Half-precision inputs are promoted to float32; float32/float64 are kept.

Which `ListLogps` fields each loss reads
----------------------------------------
* always `policy_logps`; `mask` only by spo_best_of_n / spo_ranked (pairs use columns 0 and 1).
* `ref_logps`: dpo, cdpo, robust_dpo, ipo, hinge, rdpo, hdpo, fdpo (`LossSpec.needs_ref`).
* `lengths` (tokens per response, clamped to >= 1): ipo, rdpo, simpo, cpo (its NLL), orpo, and the
  three SPO losses when `gamma != 0` (the weights mu).

Statistics (each (B,), detached): rewards/chosen, rewards/rejected, rewards/margins,
rewards/accuracies, logps/chosen, logps/rejected (summed log-probs), pref_prob (the loss's own
probability that the data's preference holds), pref_saturated (1 where pref_prob > SATURATED: the
example's gradient factor 1 - pref_prob is below 1%); SPO adds `weights`, cpo/orpo add `nll`, orpo
adds `log_odds`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# ---------------------------------------------------------------------------- types


@dataclass(frozen=True)
class LossParams:
    """Hyper-parameters of every loss; each loss reads only the ones it documents."""

    alpha: float = 1.0  # SPO softness: optimum softmax(r / alpha)
    beta: float = 0.1  # DPO-family inverse temperature (ORPO: lambda)
    gamma: float = 0.0  # weighted SPO: sharpness of mu (0 -> mu = 1)
    label_smoothing: float = 0.0  # robust / conservative DPO
    simpo_gamma: float = 0.5  # SimPO target margin
    cpo_alpha: float = 1.0  # CPO behaviour-cloning weight
    rdpo_alpha: float = 0.0  # R-DPO length penalty
    f_divergence: str = "reverse_kl"  # f-DPO: reverse_kl (DPO), forward_kl or js_divergence


@dataclass
class ListLogps:
    """Summed log-probs of B examples with n responses each, in preference order."""

    policy_logps: Tensor  # (B, n) sum of log pi_theta over response tokens, differentiable
    lengths: Tensor  # (B, n) number of response tokens
    mask: Tensor | None = None  # (B, n) bool, False for padding responses; None: all valid
    ref_logps: Tensor | None = None  # (B, n) reference log-probs (no grad); losses that need it

    @property
    def policy_chosen_logps(self) -> Tensor:  # (B,)
        """Column 0: the most preferred response."""
        return self.policy_logps[:, 0]

    @property
    def policy_rejected_logps(self) -> Tensor:  # (B,)
        """Column 1: the other response of a pair."""
        return self.policy_logps[:, 1]

    @property
    def ref_chosen_logps(self) -> Tensor:  # (B,)
        """The reference's log-probs of column 0."""
        assert self.ref_logps is not None, "this loss needs reference log-probs"
        return self.ref_logps[:, 0]

    @property
    def ref_rejected_logps(self) -> Tensor:  # (B,)
        """The reference's log-probs of column 1."""
        assert self.ref_logps is not None, "this loss needs reference log-probs"
        return self.ref_logps[:, 1]

    def valid(self) -> Tensor:  # (B, n) bool
        """Which responses are real (not padding)."""
        if self.mask is None:
            return torch.ones_like(self.policy_logps, dtype=torch.bool)
        return self.mask.bool()


@dataclass
class LossOutput:
    """Per-example losses and detached per-example statistics."""

    losses: Tensor  # (B,) per-example losses; the objective is their mean
    stats: dict[str, Tensor] = field(default_factory=dict)  # detached, each (B,)


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: its function, the data it reads, whether it needs the reference, and
    whether SPO's global KL regulariser applies."""

    name: str
    fn: Callable[[ListLogps, LossParams], LossOutput]
    data_kind: str  # "pairs" | "best_of_n" | "ranked": the data it reads by default
    needs_ref: bool  # whether ref_logps must be computed
    is_spo: bool  # SPO family: the global KL regulariser (weight beta) applies
    summary: str


LOSSES: dict[str, LossSpec] = {}


DATA_KINDS = ("pairs", "best_of_n", "ranked")


def register(name: str, data_kind: str, needs_ref: bool, is_spo: bool = False):
    """Decorator: add `fn(logps: ListLogps, params: LossParams) -> LossOutput` to the registry.

    The built-in losses use it, and so can a user's module: with `loss.module: mypkg.losses` in
    the config (or on the command line) softpo imports that module before it looks up
    `loss.name`, so `softpo train cfg.yaml loss.module=mypkg.losses loss.name=myloss` trains with
    the new loss. `data_kind` is the data it reads (pairs, best_of_n or ranked), `needs_ref`
    whether `ListLogps.ref_logps` must be computed, `is_spo` whether SPO's global KL regulariser
    (weight `loss.beta`) applies. The first line of `fn`'s docstring is its summary in
    `softpo losses`. A name registered again replaces the earlier loss.
    """
    if data_kind not in DATA_KINDS:
        raise ValueError(f"register('{name}'): data_kind must be one of {', '.join(DATA_KINDS)}, "
                         f"got {data_kind!r}")

    def wrap(fn: Callable[[ListLogps, LossParams], LossOutput]):
        summary = ((fn.__doc__ or "").strip().splitlines() or [""])[0]
        LOSSES[name] = LossSpec(name, fn, data_kind, needs_ref, is_spo, summary)
        return fn

    return wrap


def get_loss(name: str) -> LossSpec:
    """The registered loss `name`; KeyError naming the known ones otherwise."""
    if name not in LOSSES:
        raise KeyError(f"unknown loss '{name}' (known: {', '.join(sorted(LOSSES))})")
    return LOSSES[name]


@dataclass
class SampleLogps:
    """Fresh samples y ~ pi_theta(.|x): P prompts, k samples each, T sampled positions."""

    policy_token_logps: Tensor  # (P, k, T) log pi_theta(y_t | x, y_<t), differentiable
    ref_token_logps: Tensor  # (P, k, T) log pi_ref(y_t | x, y_<t), no grad
    mask: Tensor  # (P, k, T) 1.0 on sampled tokens (up to and including EOS), 0 after
    token_kl: Tensor | None = None  # (P, k, T) exact KL(pi_theta(.|x,y_<t) || pi_ref(.|x,y_<t))
    #                                 over the full vocabulary, differentiable; token estimators


@dataclass
class KLOutput:
    """A global-KL estimator's surrogate (for the gradient) and its per-sample KL estimate."""

    surrogate: Tensor  # (P, k): grad of surrogate.mean() estimates grad KL(pi_theta || pi_ref)
    kl: Tensor  # (P, k) detached per-sample estimate of the sequence KL


KL_ESTIMATORS: dict[str, Callable[[SampleLogps], KLOutput]] = {}
KL_NEEDS_TOKEN_KL: set[str] = set()  # estimators that read SampleLogps.token_kl

_NEG = -1e30  # stands in for log(0) on padded columns: finite, so no nan in forward or backward


# ---------------------------------------------------------------------------- helpers


def _hp(x: Tensor) -> Tensor:
    """Promote half precision to float32; keep float32/float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _lengths(lp: ListLogps) -> Tensor:  # (B, n) float, >= 1
    return lp.lengths.to(_hp(lp.policy_logps).dtype).clamp(min=1.0)  # no bf16 rounding of lengths


SATURATED = 0.99  # a preference probability above this leaves (1 - p) < 1% of the gradient


def _stats(rw: Tensor, rl: Tensor, logp_w: Tensor, logp_l: Tensor, acc: Tensor, pref: Tensor,
           **extra: Tensor) -> dict[str, Tensor]:
    stats = {"rewards/chosen": rw, "rewards/rejected": rl, "rewards/margins": rw - rl,
             "rewards/accuracies": acc.to(rw.dtype), "logps/chosen": logp_w,
             "logps/rejected": logp_l, "pref_prob": pref,
             "pref_saturated": (pref > SATURATED).to(rw.dtype), **extra}
    return {k: v.detach() for k, v in stats.items()}


# ---------------------------------------------------------------------------- SPO family


@torch.no_grad()
def spo_weights(logps: ListLogps, gamma: float) -> Tensor:
    """Weighted-SPO weights mu (B,), no gradient, batch mean exactly 1.

    s_i = (sum of valid logp_ij) / (sum of valid lengths_ij): per-token mean log-likelihood of the
    example's responses under the policy.  mu_i = exp(gamma (s_i - mean s)) / mean_j exp(gamma (s_j -
    mean s)) = B * softmax(gamma s)_i.  gamma = 0 returns ones; gamma > 0 down-weights examples the
    model finds unlikely.  The mean is over the micro-batch given.
    """
    logp = _hp(logps.policy_logps)
    if gamma == 0:
        return torch.ones(logp.shape[0], dtype=logp.dtype, device=logp.device)
    valid = logps.valid()
    total = torch.where(valid, logp, 0.0).sum(-1)  # (B,)
    s = total / torch.where(valid, _lengths(logps), 0.0).sum(-1).clamp(min=1.0)  # (B,)
    return s.shape[0] * torch.softmax(gamma * s, dim=0)


def _spo_output(lp: ListLogps, p: LossParams, log_pref: Tensor) -> LossOutput:
    """Shared tail: loss = -mu * log_pref / alpha, and the SPO statistics.

    log_pref (B,) is the log of the policy's tempered preference probability of the observed data
    (pair: sigmoid, best-of-n: softmax, ranked: Plackett-Luce).  Rewards are alpha * logp; the
    rejected side is the mean over the valid non-best columns.
    """
    logp, valid = _hp(lp.policy_logps), lp.valid()
    mu = spo_weights(lp, p.gamma)
    losses = -log_pref / p.alpha
    if p.gamma != 0:
        losses = losses * mu
    others = valid[:, 1:]
    logp_l = torch.where(others, logp[:, 1:], 0.0).sum(-1) / others.sum(-1).clamp(min=1)
    best_other = torch.where(others, logp[:, 1:], -math.inf).amax(-1)
    acc = logp[:, 0] > best_other
    return LossOutput(losses, _stats(p.alpha * logp[:, 0], p.alpha * logp_l, logp[:, 0], logp_l, acc,
                                     log_pref.exp(), weights=mu))


@register("spo", data_kind="pairs", needs_ref=False, is_spo=True)
def spo(lp: ListLogps, p: LossParams) -> LossOutput:
    """SPO pairwise: -(1/alpha) log sigmoid(alpha (logp_w - logp_l)), no reference model.

    With Delta = logp_w - logp_l: l = -(1/alpha) log( pi(y_w)^a / (pi(y_w)^a + pi(y_l)^a) ), gradient
    -(1 - sigmoid(alpha Delta)) grad Delta, bounded for every alpha.  Limits: alpha -> 0 gives
    log(2)/alpha - Delta/2 + alpha Delta^2/8 (linear in Delta: pushes towards argmax); alpha -> inf
    gives relu(-Delta) (zero once the order is right: flat optimum).
    Relation to TRL: CPOTrainer(loss_type="sigmoid", beta=alpha, cpo_alpha=0) computes
    -log sigmoid(alpha Delta) = alpha * l; equal at alpha = 1, otherwise a constant factor 1/alpha
    (same minimiser, learning rate scaled by 1/alpha).
    """
    z = _hp(lp.policy_logps[:, :2]) * p.alpha  # (B, 2)
    return _spo_output(lp, p, F.logsigmoid(z[:, 0] - z[:, 1]))


@register("spo_best_of_n", data_kind="best_of_n", needs_ref=False, is_spo=True)
def spo_best_of_n(lp: ListLogps, p: LossParams) -> LossOutput:
    """SPO best-of-n: -(1/alpha) log softmax_j(alpha logp_j)[0] over the valid responses (Luce).

    l = -(1/alpha) (alpha logp_0 - logsumexp_{j valid} alpha logp_j).  Padded columns (mask False)
    contribute exp(-inf) = 0.  For n = 2 this is exactly `spo`.
    """
    z = torch.where(lp.valid(), _hp(lp.policy_logps) * p.alpha, _NEG)  # (B, n)
    return _spo_output(lp, p, z[:, 0] - z.logsumexp(-1))


@register("spo_ranked", data_kind="ranked", needs_ref=False, is_spo=True)
def spo_ranked(lp: ListLogps, p: LossParams) -> LossOutput:
    """SPO ranked (Plackett-Luce): -(1/alpha) sum_k log( pi_k^a / sum_{j>=k} pi_j^a ), best first.

    Columns are in rank order; the sum runs over valid positions k that have a valid column after
    them (k = 1..n-1), and j >= k over valid columns only.  The suffix log-sum-exps come from one
    logcumsumexp over the reversed columns; padded columns hold a large finite negative number so
    neither the forward nor the backward pass sees inf - inf.  For n = 2 this is exactly `spo`.
    """
    valid = lp.valid()
    z = torch.where(valid, _hp(lp.policy_logps) * p.alpha, _NEG)  # (B, n)
    suffix_lse = z.flip(-1).logcumsumexp(-1).flip(-1)  # (B, n) logsumexp_{j >= k} z_j
    later = valid.flip(-1).cumsum(-1).flip(-1) - valid.long()  # (B, n) valid columns after k
    terms = torch.where(valid & (later > 0), z - suffix_lse, 0.0)
    return _spo_output(lp, p, terms.sum(-1))


# ---------------------------------------------------------------------------- DPO-family baselines


def _pair(lp: ListLogps, ref: bool = False) -> tuple[Tensor, ...]:
    """(logp_w, logp_l) and, when asked, the log-ratios (logp - ref) of both, all (B,)."""
    pw, pl = _hp(lp.policy_chosen_logps), _hp(lp.policy_rejected_logps)
    if not ref:
        return pw, pl
    return pw, pl, pw - _hp(lp.ref_chosen_logps).detach(), pl - _hp(lp.ref_rejected_logps).detach()


def _baseline(losses: Tensor, rw: Tensor, rl: Tensor, lp: ListLogps, **extra: Tensor) -> LossOutput:
    """Baseline statistics as TRL logs them: accuracy = rewards/chosen > rewards/rejected,
    pref_prob = sigmoid(reward margin), the implicit Bradley-Terry preference probability."""
    pw, pl = _pair(lp)
    return LossOutput(losses, _stats(rw, rl, pw, pl, rw > rl, torch.sigmoid(rw - rl), **extra))


def _dpo_like(lp: ListLogps, p: LossParams, loss_of_h: Callable[[Tensor], Tensor]) -> LossOutput:
    """h = (logp_w - ref_w) - (logp_l - ref_l); rewards beta * (logp - ref) (TRL DPOTrainer)."""
    _, _, cw, cl = _pair(lp, ref=True)
    return _baseline(loss_of_h(cw - cl), p.beta * cw, p.beta * cl, lp)


@register("dpo", data_kind="pairs", needs_ref=True)
def dpo(lp: ListLogps, p: LossParams) -> LossOutput:
    """DPO (Rafailov et al. 2023): -log sigmoid(beta h), h = (pw - rw) - (pl - rl).

    TRL: DPOTrainer(loss_type="sigmoid", beta).  Rewards beta (logp - ref).
    """
    return _dpo_like(lp, p, lambda h: -F.logsigmoid(p.beta * h))


@register("cdpo", data_kind="pairs", needs_ref=True)
def cdpo(lp: ListLogps, p: LossParams) -> LossOutput:
    """Conservative DPO (label smoothing eps): -(1-eps) log sig(beta h) - eps log sig(-beta h).

    Mitchell (2023), "A note on DPO with noisy preferences": DPO against labels flipped with
    probability eps = label_smoothing.  TRL: older DPOTrainer(loss_type="sigmoid", label_smoothing)
    and today's CPOTrainer sigmoid form with a reference.  eps = 0 is `dpo`.
    """
    eps = p.label_smoothing
    return _dpo_like(lp, p, lambda h: -(1 - eps) * F.logsigmoid(p.beta * h)
                     - eps * F.logsigmoid(-p.beta * h))


@register("robust_dpo", data_kind="pairs", needs_ref=True)
def robust_dpo(lp: ListLogps, p: LossParams) -> LossOutput:
    """Robust DPO: [-(1-eps) log sig(beta h) + eps log sig(-beta h)] / (1 - 2 eps).

    Chowdhury et al. 2024, "Provably robust DPO": the unbiased loss under label noise eps
    (= label_smoothing, in [0, 0.5)).  TRL: DPOTrainer(loss_type="robust", label_smoothing).
    Note the sign of the flipped term differs from `cdpo`; eps = 0 is `dpo`.
    """
    eps = p.label_smoothing
    return _dpo_like(lp, p, lambda h: (-(1 - eps) * F.logsigmoid(p.beta * h)
                                       + eps * F.logsigmoid(-p.beta * h)) / (1 - 2 * eps))


@register("ipo", data_kind="pairs", needs_ref=True)
def ipo(lp: ListLogps, p: LossParams) -> LossOutput:
    """IPO (Azar et al. 2023): (h_avg - 1/(2 beta))^2 with per-token averaged log-ratios.

    h_avg = (pw - rw)/|y_w| - (pl - rl)/|y_l|, as TRL DPOTrainer(loss_type="ipo") (length-normalised,
    confirmed with the IPO authors per TRL).  Rewards (logged) beta (logp - ref), summed, as TRL.
    """
    _, _, cw, cl = _pair(lp, ref=True)
    n = _lengths(lp)
    losses = (cw / n[:, 0] - cl / n[:, 1] - 1 / (2 * p.beta)) ** 2
    return _baseline(losses, p.beta * cw, p.beta * cl, lp)


@register("hinge", data_kind="pairs", needs_ref=True)
def hinge(lp: ListLogps, p: LossParams) -> LossOutput:
    """Hinge / SLiC (Zhao et al. 2023): relu(1 - beta h).  TRL: DPOTrainer(loss_type="hinge")."""
    return _dpo_like(lp, p, lambda h: torch.relu(1 - p.beta * h))


@register("rdpo", data_kind="pairs", needs_ref=True)
def rdpo(lp: ListLogps, p: LossParams) -> LossOutput:
    """R-DPO (Park et al. 2024): -log sigmoid(beta h - rdpo_alpha (|y_w| - |y_l|)).

    The length penalty subtracts rdpo_alpha per extra chosen token.  No TRL loss_type (TRL's
    `ld_alpha` is a different, LD-DPO weighting).  rdpo_alpha = 0 is `dpo`.
    """
    n = _lengths(lp)
    return _dpo_like(lp, p, lambda h: -F.logsigmoid(p.beta * h - p.rdpo_alpha * (n[:, 0] - n[:, 1])))


@register("hdpo", data_kind="pairs", needs_ref=True)
def hdpo(lp: ListLogps, p: LossParams) -> LossOutput:
    """H-DPO / soft preference learning: -log sigmoid(beta (alpha (pw - pl) - (rw - rl))).

    Omura, Fujita, Kataoka 2024, "Entropy Controllable Direct Preference Optimization" (arXiv
    2411.07595): the reverse KL of RLHF, KL(pi || ref) = -H(pi) + H(pi, ref), gets an entropy
    coefficient alpha:  max_pi E_pi[r] - beta (-alpha H(pi) + H(pi, ref)).  Its maximiser is
        pi*(y|x) ∝ (pi_ref(y|x) exp(r(x,y) / beta))^(1/alpha),
    so r = beta (alpha log pi* - log pi_ref) + c(x), and Bradley-Terry on that reward gives
    l = -log sigmoid(beta ((alpha pw - rw) - (alpha pl - rl))).  alpha < 1 sharpens (the paper's
    mode-seeking setting), alpha > 1 flattens, alpha = 1 is `dpo` exactly.  Soft Preference
    Learning (Slocum, Parker-Sartori, Hadfield-Menell, ICLR 2025, arXiv 2511.08594) decouples the
    same two terms as E[r] + a H(pi) - b H(pi, ref), optimum ∝ pi_ref^(b/a) exp(r/a): this loss with
    alpha = a / b, beta = b.  Rewards (logged) beta (alpha logp - ref).  No TRL loss_type.
    """
    pw, pl = _pair(lp)
    sw = p.alpha * pw - _hp(lp.ref_chosen_logps).detach()  # (B,)
    sl = p.alpha * pl - _hp(lp.ref_rejected_logps).detach()  # (B,)
    return _baseline(-F.logsigmoid(p.beta * (sw - sl)), p.beta * sw, p.beta * sl, lp)


def _f_prime_reverse_kl(u: Tensor) -> Tensor:
    return u


def _f_prime_forward_kl(u: Tensor) -> Tensor:
    return -torch.exp(-u)


def _f_prime_js(u: Tensor) -> Tensor:
    return F.logsigmoid(u) + math.log(2)


# f'(pi / ref) as a function of the log-ratio u = log pi - log ref, up to an additive constant
F_DIVERGENCES: dict[str, Callable[[Tensor], Tensor]] = {
    "reverse_kl": _f_prime_reverse_kl,  # f(t) = t log t:  f'(t) = log t + 1
    "forward_kl": _f_prime_forward_kl,  # f(t) = -log t:   f'(t) = -1/t
    "js_divergence": _f_prime_js,  # f(t) = t log t - (t + 1) log((t + 1)/2):  f'(t) = log(2t/(1+t))
}


@register("fdpo", data_kind="pairs", needs_ref=True)
def fdpo(lp: ListLogps, p: LossParams) -> LossOutput:
    """f-DPO: -log sigmoid(beta (f'(pi_w/ref_w) - f'(pi_l/ref_l))), f = loss.f_divergence.

    Wang, Jiang, Yang, Liu, Chen 2023, "Beyond Reverse KL: Generalizing Direct Preference
    Optimization with Diverse Divergence Constraints" (arXiv 2309.16240): RLHF with an f-divergence
    D_f(pi || ref) = E_ref[f(pi/ref)] instead of the reverse KL has the maximiser
        f'(pi*(y|x) / pi_ref(y|x)) = (r(x,y) - c(x)) / beta,
    so r = beta f'(pi/ref) + c(x), and Bradley-Terry gives the loss above.  With u = log(pi/ref):
        reverse_kl     f'(t) = log t + 1        score u                 (`dpo` exactly)
        forward_kl     f'(t) = -1/t             score -exp(-u)          (KL(ref || pi): covers modes)
        js_divergence  f'(t) = log(2t/(1+t))    score log 2 + log sigmoid(u)
    Additive constants in f' cancel in the difference (TRL's forward_kl uses 1 - 1/t).  TRL:
    DPOTrainer(loss_type="sigmoid", f_divergence_type=f, beta).  Rewards (logged) beta (logp - ref)
    as TRL logs them; pref_prob is the loss's own sigmoid(beta (s_w - s_l)).
    """
    if p.f_divergence not in F_DIVERGENCES:
        raise ValueError(f"fdpo: unknown f_divergence {p.f_divergence!r} "
                         f"(known: {', '.join(F_DIVERGENCES)})")
    score = F_DIVERGENCES[p.f_divergence]
    pw, pl, cw, cl = _pair(lp, ref=True)
    z = p.beta * (score(cw) - score(cl))  # (B,)
    rw, rl = p.beta * cw, p.beta * cl
    return LossOutput(-F.logsigmoid(z), _stats(rw, rl, pw, pl, rw > rl, torch.sigmoid(z)))


@register("simpo", data_kind="pairs", needs_ref=False)
def simpo(lp: ListLogps, p: LossParams) -> LossOutput:
    """SimPO (Meng et al. 2024): -log sigmoid(beta (pw/|y_w| - pl/|y_l|) - simpo_gamma).

    Average log-probs, no reference.  The paper's gamma_beta_ratio is simpo_gamma / beta.  TRL:
    CPOTrainer(loss_type="simpo", simpo_gamma, cpo_alpha=0).  Rewards beta * average logp.
    """
    pw, pl = _pair(lp)
    n = _lengths(lp)
    aw, al = pw / n[:, 0], pl / n[:, 1]
    return _baseline(-F.logsigmoid(p.beta * (aw - al) - p.simpo_gamma), p.beta * aw, p.beta * al, lp)


@register("cpo", data_kind="pairs", needs_ref=False)
def cpo(lp: ListLogps, p: LossParams) -> LossOutput:
    """CPO (Xu et al. 2024): -log sigmoid(beta (pw - pl)) + cpo_alpha * NLL(y_w), NLL = -pw/|y_w|.

    TRL: CPOTrainer(loss_type="sigmoid", beta, cpo_alpha); TRL's NLL is the token mean over the whole
    batch, ours the per-example token mean (equal when chosen lengths are equal).  With cpo_alpha = 0
    and beta = alpha this is alpha * `spo`.  Rewards beta * logp.
    """
    pw, pl = _pair(lp)
    nll = -pw / _lengths(lp)[:, 0]
    losses = -F.logsigmoid(p.beta * (pw - pl)) + p.cpo_alpha * nll
    return _baseline(losses, p.beta * pw, p.beta * pl, lp, nll=nll)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable (Maechler 2012): log(-expm1 x) near 0, log1p(-exp x) far."""
    x = x.clamp(max=-1e-30 if x.dtype == torch.float64 else -1e-12)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@register("orpo", data_kind="pairs", needs_ref=False)
def orpo(lp: ListLogps, p: LossParams) -> LossOutput:
    """ORPO (Hong et al. 2024): NLL(y_w) - beta log sigmoid(log_odds_w - log_odds_l).

    a = logp/|y| (average log-prob), log_odds = a - log(1 - exp a), NLL = -a_w; beta is ORPO's lambda.
    TRL: ORPOTrainer(beta) (its NLL is the token mean over the batch).  Rewards beta * a.
    """
    pw, pl = _pair(lp)
    n = _lengths(lp)
    aw, al = pw / n[:, 0], pl / n[:, 1]
    log_odds = (aw - log1mexp(aw)) - (al - log1mexp(al))
    losses = -aw - p.beta * F.logsigmoid(log_odds)
    return _baseline(losses, p.beta * aw, p.beta * al, lp, nll=-aw, log_odds=log_odds)


# ---------------------------------------------------------------------------- global KL estimators


def exact_token_kl(policy_logits: Tensor, ref_logits: Tensor) -> Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) over the last axis: (..., V) -> (...).

    log_softmax in float32 (float64 kept); differentiable in policy_logits.  Logits must be finite.
    """
    lp = _hp(policy_logits).log_softmax(-1)
    lq = _hp(ref_logits).log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def register_kl(name: str, needs_token_kl: bool = False):
    """Decorator: add a global-KL estimator `fn(SampleLogps) -> KLOutput` to the registry."""
    def wrap(fn: Callable[[SampleLogps], KLOutput]):
        KL_ESTIMATORS[name] = fn
        if needs_token_kl:
            KL_NEEDS_TOKEN_KL.add(name)
        return fn

    return wrap


def _loo_mean(x: Tensor) -> Tensor:
    """Mean over the other k-1 samples of the same prompt (dim 1); zeros when k = 1."""
    k = x.shape[1]
    return (x.sum(1, keepdim=True) - x) / (k - 1) if k > 1 else torch.zeros_like(x)


def _score(weight: Tensor, logp: Tensor) -> Tensor:
    """Zero-valued term whose gradient is weight * grad logp (weight must carry no gradient)."""
    return weight.detach() * (logp - logp.detach())


@register_kl("seq")
def kl_seq(s: SampleLogps) -> KLOutput:
    """Sequence score function with a leave-one-out baseline: unbiased for grad KL(pi || ref).

    r_i = sum_t (log pi - log ref)(y_it) (no grad), b_i = mean of r over the other k-1 samples of the
    prompt, surrogate_i = r_i + (r_i - b_i)(logp_i - stopgrad logp_i): its value is the KL estimate
    r_i, its gradient (r_i - b_i) grad logp_i.
    Proof.  KL = sum_y pi(y) r(y) with r = log pi - log ref, so grad KL = sum_y grad pi (r) + sum_y
    pi grad r = E[r grad log pi] + E[grad log pi], and E[grad log pi] = grad sum_y pi(y) = grad 1 = 0.
    b_i is a function of the other samples only, independent of y_i, so E[b_i grad log pi(y_i)] =
    E[b_i] * 0 = 0.  Hence E[(r_i - b_i) grad logp_i] = grad KL.  kl = r_i, E[r_i] = KL.
    """
    m = s.mask.bool()
    logp = torch.where(m, s.policy_token_logps, 0.0).sum(-1)  # (P, k)
    r = torch.where(m, s.policy_token_logps - s.ref_token_logps, 0.0).sum(-1).detach()  # (P, k)
    return KLOutput(r + _score(r - _loo_mean(r), logp), r)


def _token_kl(s: SampleLogps) -> Tensor:  # (P, k, T), zero on padding
    if s.token_kl is None:
        raise ValueError("this KL estimator needs SampleLogps.token_kl (exact per-position KL)")
    return torch.where(s.mask.bool(), s.token_kl, 0.0)


@register_kl("token", needs_token_kl=True)
def kl_token(s: SampleLogps) -> KLOutput:
    """Token-level (the paper's): surrogate_i = sum_t KL(pi(.|x,y_<t) || ref(.|x,y_<t)) along y_i.

    Value: unbiased for KL, since by the chain rule KL(pi||ref) = E_y sum_t KL_t(y_<t).  Gradient:
    E[sum_t grad KL_t(y_<t)] with the prefixes held fixed, i.e. grad of E_{y ~ stopgrad pi} sum_t KL_t;
    it drops E[sum_t KL_t grad log pi(y_<t)], how theta changes which prefixes are visited, so it is
    biased (low variance: no score function).  `token_sf` adds the missing term.
    """
    kl = _token_kl(s).sum(-1)  # (P, k)
    return KLOutput(kl, kl.detach())


@register_kl("token_sf", needs_token_kl=True)
def kl_token_sf(s: SampleLogps) -> KLOutput:
    """Token-level plus score-function correction: unbiased for grad KL(pi || ref).

    surrogate_i = sum_t KL_t + sum_t stopgrad(G_t - b_t) (log pi(y_t|y_<t) - stopgrad), with
    G_t = sum_{t' > t} KL_t' (KL-to-go after choosing y_t) and b_t the mean of G_t over the other
    samples of the prompt.  Value: sum_t KL_t (unbiased for KL).
    Proof.  KL = E_y[sum_t KL_t(y_<t)].  Differentiating the expectation and its integrand:
    grad KL = E[sum_t grad KL_t] + E[sum_t KL_t grad log pi(y_<t)], and log pi(y_<t) = sum_{s<t}
    log pi(y_s|y_<s), so the second term is E[sum_s grad log pi(y_s|y_<s) sum_{t>s} KL_t] =
    E[sum_s G_s grad log pi(y_s|y_<s)].  b_s is independent of sample i, and E[grad log pi(y_s|y_<s)
    | y_<s] = 0, so subtracting it keeps the expectation.  Positions after EOS have KL_t = 0 and mask 0.
    """
    kl_t = _token_kl(s)  # (P, k, T)
    go = (kl_t.flip(-1).cumsum(-1).flip(-1) - kl_t).detach()  # (P, k, T) sum_{t' > t}
    lp_t = torch.where(s.mask.bool(), s.policy_token_logps, 0.0)
    kl = kl_t.sum(-1)
    return KLOutput(kl + _score(go - _loo_mean(go), lp_t).sum(-1), kl.detach())
