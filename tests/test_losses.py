"""Preference losses against hand-worked values, identities between them, masking, limits, weights.

softplus(x) = log(1 + e^x) = -log sigmoid(-x) is used throughout the arithmetic; useful values:
softplus(-0.5) = log(1 + 0.606531) = 0.474077, softplus(0.5) = 0.5 + softplus(-0.5) = 0.974077.
"""

import itertools
import math

import pytest
import torch

from softpo import losses as L
from softpo.losses import LOSSES, ListLogps, LossParams

D = torch.float64


def _col(x, like):
    return x if isinstance(x, list) else [x] * len(like)


def pairs(pw, pl, rw=None, rl=None, nw=1, nl=1):
    """Pairs as ListLogps (float64); scalars broadcast over the batch."""
    pw, pl = _col(pw, [0]), _col(pl, [0])
    two = lambda a, b: torch.tensor([_col(a, pw), _col(b, pw)], dtype=D).T.contiguous()  # noqa: E731
    ref = None if rw is None else two(rw, rl)
    return ListLogps(two(pw, pl).requires_grad_(), two(nw, nl), None, ref)


def lists(logps, mask=None, lengths=None):
    lp = torch.tensor(logps, dtype=D).requires_grad_()
    n = torch.ones_like(lp) if lengths is None else torch.tensor(lengths, dtype=D)
    return ListLogps(lp, n, None if mask is None else torch.tensor(mask), None)


def loss(name, lp, **params):
    return LOSSES[name].fn(lp, LossParams(**params))


# ---------------------------------------------------------------------------- hand values


def test_spo_pair_hand_value():
    """logp_w = -2, logp_l = -3, alpha = 0.5: Delta = 1, l = -(1/0.5) log sigmoid(0.5)
    = 2 softplus(-0.5) = 2 * 0.474077 = 0.948154.  Rewards 0.5 * (-2, -3) = (-1, -1.5),
    pref_prob = sigmoid(0.5) = 0.622459, accuracy 1 (chosen more likely)."""
    out = loss("spo", pairs(-2.0, -3.0), alpha=0.5)
    assert out.losses.item() == pytest.approx(0.948154, abs=1e-6)
    s = out.stats
    assert s["rewards/chosen"].item() == pytest.approx(-1.0)
    assert s["rewards/rejected"].item() == pytest.approx(-1.5)
    assert s["rewards/margins"].item() == pytest.approx(0.5)
    assert s["pref_prob"].item() == pytest.approx(0.622459, abs=1e-6)
    assert s["rewards/accuracies"].item() == 1.0
    assert s["logps/chosen"].item() == -2.0 and s["logps/rejected"].item() == -3.0
    assert s["weights"].item() == 1.0


def test_spo_best_of_n_hand_value():
    """logps (-1, -2, -3), winner first.  alpha = 1: -log(e^-1 / (e^-1 + e^-2 + e^-3))
    = log(1 + e^-1 + e^-2) = log(1.503215) = 0.407606.  alpha = 0.5: 2 log(1 + e^-0.5 + e^-1)
    = 2 log(1.974410) = 1.360539.  rewards/rejected (alpha 1) = mean(-2, -3) = -2.5."""
    lp = lists([[-1.0, -2.0, -3.0]])
    a1 = loss("spo_best_of_n", lp, alpha=1.0)
    assert a1.losses.item() == pytest.approx(0.407606, abs=1e-6)
    assert a1.stats["pref_prob"].item() == pytest.approx(1 / 1.503215, abs=1e-6)
    assert a1.stats["rewards/rejected"].item() == pytest.approx(-2.5)
    assert a1.stats["logps/rejected"].item() == pytest.approx(-2.5)
    assert loss("spo_best_of_n", lp, alpha=0.5).losses.item() == pytest.approx(1.360539, abs=1e-6)


def test_spo_ranked_hand_value():
    """Ranking (-1, -2, -3), alpha = 1: k = 1 gives log(1 + e^-1 + e^-2) = 0.407606, k = 2 gives
    -log(e^-2 / (e^-2 + e^-3)) = log(1 + e^-1) = 0.313262; total 0.720868; PL probability
    exp(-0.720868) = 0.665241 * 0.731059 = 0.486330.  alpha = 0.5: 2 (log(1 + e^-.5 + e^-1) + log(1 + e^-.5))
    = 2 (0.680270 + 0.474077) = 2.308693."""
    lp = lists([[-1.0, -2.0, -3.0]])
    a1 = loss("spo_ranked", lp, alpha=1.0)
    assert a1.losses.item() == pytest.approx(0.720868, abs=1e-6)
    assert a1.stats["pref_prob"].item() == pytest.approx(0.486330, abs=1e-6)
    assert loss("spo_ranked", lp, alpha=0.5).losses.item() == pytest.approx(2.308693, abs=1e-6)


# Shared baseline batch: pw = -2, pl = -3, rw = rl = -2.5, |y_w| = 2, |y_l| = 4, beta = 0.5.
# h = (pw - rw) - (pl - rl) = 0.5 - (-0.5) = 1; beta h = 0.5.
BASE = dict(pw=-2.0, pl=-3.0, rw=-2.5, rl=-2.5, nw=2, nl=4)

BASELINE_CASES = [
    # dpo: -log sigmoid(0.5) = softplus(-0.5)
    ("dpo", {}, 0.474077),
    # cdpo eps = .1: 0.9 softplus(-.5) + 0.1 softplus(.5) = 0.426669 + 0.097408
    ("cdpo", {"label_smoothing": 0.1}, 0.524077),
    # robust eps = .1: (0.9 softplus(-.5) - 0.1 softplus(.5)) / 0.8 = 0.329262 / 0.8
    ("robust_dpo", {"label_smoothing": 0.1}, 0.411577),
    # ipo: h_avg = 0.5/2 - (-0.5)/4 = 0.375, 1/(2 beta) = 1: (0.375 - 1)^2
    ("ipo", {}, 0.390625),
    # hinge: relu(1 - 0.5)
    ("hinge", {}, 0.5),
    # rdpo alpha .1: -log sigmoid(0.5 - 0.1 (2 - 4)) = softplus(-0.7) = log(1.496585)
    ("rdpo", {"rdpo_alpha": 0.1}, 0.403186),
    # simpo gamma .5: avg -1 vs -0.75, 0.5 (-0.25) - 0.5 = -0.625: softplus(0.625) = log(2.868246)
    ("simpo", {"simpo_gamma": 0.5}, 1.053701),
    # cpo alpha 1: softplus(-0.5) + NLL, NLL = -(-2)/2 = 1
    ("cpo", {"cpo_alpha": 1.0}, 1.474077),
    # orpo: a_w = -1, a_l = -0.75, log odds: -1 - log(1 - e^-1) = -0.541325,
    #   -0.75 - log(1 - e^-0.75) = -0.110647; difference -0.430678;
    #   NLL 1 + 0.5 softplus(0.430678) = 1 + 0.5 * 0.931495
    ("orpo", {}, 1.465747),
]


@pytest.mark.parametrize("name,params,expected", BASELINE_CASES)
def test_baseline_hand_values(name, params, expected):
    out = loss(name, pairs(**BASE), beta=0.5, **params)
    assert out.losses.item() == pytest.approx(expected, abs=1e-6)


def test_baseline_rewards_follow_trl():
    """DPO family: rewards beta (logp - ref) = 0.5 * (0.5, -0.5); CPO: beta logp = (-1, -1.5);
    SimPO/ORPO: beta * average logp = 0.5 * (-1, -0.75) (rejected more likely per token: acc 0)."""
    lp = pairs(**BASE)
    for name in ("dpo", "cdpo", "robust_dpo", "ipo", "hinge", "rdpo"):
        s = loss(name, lp, beta=0.5).stats
        assert (s["rewards/chosen"].item(), s["rewards/rejected"].item()) == (0.25, -0.25)
        assert s["pref_prob"].item() == pytest.approx(1 / (1 + math.exp(-0.5)))
    s = loss("cpo", lp, beta=0.5).stats
    assert (s["rewards/chosen"].item(), s["rewards/rejected"].item()) == (-1.0, -1.5)
    for name in ("simpo", "orpo"):
        s = loss(name, lp, beta=0.5).stats
        assert (s["rewards/chosen"].item(), s["rewards/rejected"].item()) == (-0.5, -0.375)
        assert s["rewards/accuracies"].item() == 0.0


def test_label_smoothing_zero_and_rdpo_zero_are_dpo():
    lp = pairs([-2.0, -1.0], [-3.0, -4.0], [-2.5, -1.2], [-2.0, -3.0], [3, 5], [7, 2])
    ref = loss("dpo", lp, beta=0.3).losses
    for name in ("cdpo", "robust_dpo", "rdpo"):
        assert torch.allclose(loss(name, lp, beta=0.3).losses, ref)
    assert not torch.allclose(loss("rdpo", lp, beta=0.3, rdpo_alpha=0.1).losses, ref)


def test_hdpo_hand_value():
    """H-DPO on BASE (pw = -2, pl = -3, rw = rl = -2.5, beta = 0.5), alpha = 0.5:
    s_w = alpha pw - rw = -1 + 2.5 = 1.5, s_l = alpha pl - rl = -1.5 + 2.5 = 1.0;
    l = -log sigmoid(beta (s_w - s_l)) = softplus(-0.25) = log(1 + e^-0.25) = log(1.778801)
    = 0.575939.  Rewards beta s = (0.75, 0.5), pref_prob sigmoid(0.25) = 0.562177."""
    out = loss("hdpo", pairs(**BASE), beta=0.5, alpha=0.5)
    assert out.losses.item() == pytest.approx(0.575939, abs=1e-6)
    assert (out.stats["rewards/chosen"].item(), out.stats["rewards/rejected"].item()) == (0.75, 0.5)
    assert out.stats["pref_prob"].item() == pytest.approx(0.562177, abs=1e-6)


def test_hdpo_at_alpha_one_is_dpo():
    """alpha = 1: beta ((pw - rw) - (pl - rl)) = DPO's logit; losses, gradients and statistics are
    DPO's.  Any other alpha changes the loss."""
    def run(name, alpha):
        lp = pairs([-2.0, -1.0, -8.0], [-3.0, -4.0, -2.0], [-2.5, -1.2, -7.0], [-2.0, -3.0, -2.5])
        out = loss(name, lp, beta=0.3, alpha=alpha)
        out.losses.sum().backward()
        return out, lp.policy_logps.grad
    (d, dg), (h, hg) = run("dpo", 1.0), run("hdpo", 1.0)
    assert torch.equal(h.losses, d.losses) and torch.equal(hg, dg)
    assert all(torch.equal(h.stats[k], d.stats[k]) for k in d.stats)
    for alpha in (0.5, 2.0):
        assert not torch.allclose(run("hdpo", alpha)[0].losses, d.losses)


# f-DPO batch: pw = -2, pl = -3, rw = rl = -3: log-ratios u_w = 1, u_l = 0, beta = 0.5.
FDPO = dict(pw=-2.0, pl=-3.0, rw=-3.0, rl=-3.0)


@pytest.mark.parametrize("divergence,expected,pref", [
    # reverse KL: scores u: beta (1 - 0) = 0.5, softplus(-0.5); pref sigmoid(0.5)
    ("reverse_kl", 0.474077, 0.622459),
    # forward KL: scores -e^-u: -e^-1 - (-1) = 0.632121, beta * = 0.316060,
    #   softplus(-0.316060) = log(1 + 0.729016) = 0.547552; pref sigmoid(0.316060) = 0.578364
    ("forward_kl", 0.547552, 0.578364),
    # JS: scores log 2 + log sigmoid(u): log sigmoid(1) - log sigmoid(0) = -0.313262 + 0.693147
    #   = 0.379885, beta * = 0.189943, softplus(-0.189943) = log(1 + 0.827006) = 0.602679;
    #   pref sigmoid(0.189943) = 0.547343
    ("js_divergence", 0.602679, 0.547343),
])
def test_fdpo_hand_values(divergence, expected, pref):
    out = loss("fdpo", pairs(**FDPO), beta=0.5, f_divergence=divergence)
    assert out.losses.item() == pytest.approx(expected, abs=1e-6)
    assert out.stats["pref_prob"].item() == pytest.approx(pref, abs=1e-6)
    # rewards as TRL logs them for every f: beta (logp - ref) = (0.5, 0)
    assert (out.stats["rewards/chosen"].item(), out.stats["rewards/rejected"].item()) == (0.5, 0.0)


def test_fdpo_reverse_kl_is_dpo_and_the_others_are_not():
    """f(t) = t log t has f'(t) = log t + 1: the score is the log-ratio and the constant cancels,
    so `fdpo` with its default f_divergence is `dpo` (loss, gradient, statistics)."""
    def run(name, **params):
        lp = pairs([-2.0, -1.0, -8.0], [-3.0, -4.0, -2.0], [-2.5, -1.2, -7.0], [-2.0, -3.0, -2.5])
        out = loss(name, lp, beta=0.3, **params)
        out.losses.sum().backward()
        return out, lp.policy_logps.grad
    (d, dg), (f, fg) = run("dpo"), run("fdpo")
    assert LossParams().f_divergence == "reverse_kl"
    assert torch.allclose(f.losses, d.losses, atol=1e-15) and torch.allclose(fg, dg, atol=1e-15)
    assert all(torch.allclose(f.stats[k], d.stats[k], atol=1e-15) for k in d.stats)
    for divergence in ("forward_kl", "js_divergence"):
        assert not torch.allclose(run("fdpo", f_divergence=divergence)[0].losses, d.losses)
    with pytest.raises(ValueError, match="unknown f_divergence"):
        run("fdpo", f_divergence="tv")


def test_fdpo_scores_are_f_prime_of_the_ratio():
    """The scores are f'(t) at t = pi/ref up to a constant: forward KL f(t) = -log t gives -1/t;
    JS f(t) = t log t - (t+1) log((t+1)/2) gives log(2t/(1+t)); checked by a finite difference."""
    u = torch.tensor([-1.5, -0.2, 0.0, 0.7, 2.0], dtype=D)
    t, eps = u.exp(), 1e-6
    fs = {"forward_kl": lambda t: -torch.log(t),
          "js_divergence": lambda t: t * t.log() - (t + 1) * ((t + 1) / 2).log()}
    for name, f in fs.items():
        numeric = (f(t + eps) - f(t - eps)) / (2 * eps)
        assert torch.allclose(L.F_DIVERGENCES[name](u), numeric, atol=1e-8), name


def test_orpo_safe_near_probability_one():
    """avg logp -> 0 means odds -> infinity; the loss stays finite, gradients too."""
    lp = pairs([-1e-9, -1e-3], [-5.0, -1e-9], nw=[3, 3], nl=[3, 3])
    out = loss("orpo", lp, beta=0.1)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(lp.policy_logps.grad).all()


# ---------------------------------------------------------------------------- identities


@pytest.mark.parametrize("alpha", [0.1, 1.0, 3.0])
def test_pair_best_of_n_ranked_agree_for_two(alpha):
    """n = 2: sigmoid(a(w - l)) = e^{aw}/(e^{aw} + e^{al}) = the one Plackett-Luce factor."""
    vals = torch.tensor([[-2.0, -3.0], [-5.0, -1.0], [-0.3, -0.3]], dtype=D)
    outs, grads = [], []
    for name in ("spo", "spo_best_of_n", "spo_ranked"):
        lp = ListLogps(vals.clone().requires_grad_(), torch.ones_like(vals))
        out = loss(name, lp, alpha=alpha)
        out.losses.sum().backward()
        outs.append(out.losses.detach())
        grads.append(lp.policy_logps.grad)
    for o, g in zip(outs[1:], grads[1:]):
        assert torch.allclose(o, outs[0], atol=1e-12) and torch.allclose(g, grads[0], atol=1e-12)


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_cpo_over_alpha_is_spo(alpha):
    """CPO(cpo_alpha=0, beta=alpha) = -log sigmoid(alpha Delta) = alpha * SPO: identical at alpha=1,
    a constant factor otherwise (same minimiser); DESIGN's TRL parity target is this CPO form."""
    lp = pairs([-2.0, -7.0, -1.0], [-3.0, -1.0, -1.0], nw=[2, 5, 1], nl=[4, 3, 9])
    c = loss("cpo", lp, beta=alpha, cpo_alpha=0.0).losses
    s = loss("spo", lp, alpha=alpha).losses
    assert torch.allclose(c / alpha, s, atol=1e-12)
    if alpha != 1.0:
        assert not torch.allclose(c, s)


def test_spo_gradient_formula():
    """d l / d theta = -(1 - sigmoid(alpha Delta)) d Delta / d theta, with Delta = logp_w - logp_l."""
    theta = torch.tensor([0.3, -1.2, 0.7], dtype=D, requires_grad=True)
    pw = -(theta ** 2).sum() - 1.0
    pl = theta.sum() * 0.5 - 2.0
    alpha = 0.7
    lp = ListLogps(torch.stack([pw, pl])[None], torch.ones(1, 2, dtype=D))
    (g,) = torch.autograd.grad(loss("spo", lp, alpha=alpha).losses.sum(), theta)
    delta = (pw - pl).detach()
    expected = -(1 - torch.sigmoid(alpha * delta)) * (-2 * theta.detach() - 0.5)
    assert torch.allclose(g, expected, atol=1e-12)


def test_spo_small_alpha_limit():
    """softplus(x) = log 2 + x/2 + x^2/8 - x^4/192 + ...: l = softplus(-a Delta)/a
    = log(2)/a - Delta/2 + a Delta^2/8 + O(a^3): linear in Delta, it keeps pushing (argmax)."""
    for delta in (-2.0, 0.5, 3.0):
        a = 1e-3
        l = loss("spo", pairs(delta, 0.0), alpha=a).losses.item()
        assert l == pytest.approx(math.log(2) / a - delta / 2 + a * delta ** 2 / 8, abs=1e-8)


def test_spo_large_alpha_limit():
    """l - relu(-Delta) = softplus(-a |Delta|) / a, in (0, log(2)/a]: l -> relu(-Delta) (zero loss
    once the order is right), equality to log(2)/a at Delta = 0."""
    a = 200.0
    for delta in (-2.0, -0.1, 0.0, 0.1, 2.0):
        l = loss("spo", pairs(delta, 0.0), alpha=a).losses.item()
        gap = l - max(0.0, -delta)
        assert 0 <= gap <= math.log(2) / a + 1e-15
        assert gap == pytest.approx(math.log1p(math.exp(-a * abs(delta))) / a, abs=1e-13)
    assert loss("spo", pairs(0.0, 0.0), alpha=a).losses.item() == pytest.approx(math.log(2) / a)


# ---------------------------------------------------------------------------- lists


def plackett_luce_brute(logps, alpha):
    """-(1/a) sum_{k<n} log( exp(a l_k) / sum_{j>=k} exp(a l_j) ), with plain Python floats."""
    total = 0.0
    for k in range(len(logps) - 1):
        total += math.log(math.exp(alpha * logps[k]) / sum(math.exp(alpha * v) for v in logps[k:]))
    return -total / alpha


@pytest.mark.parametrize("n", [3, 4])
def test_ranked_matches_brute_force(n):
    rows = torch.randn(5, n, dtype=D) * 2 - 3
    for alpha in (0.3, 1.0, 2.5):
        got = loss("spo_ranked", ListLogps(rows.clone(), torch.ones_like(rows)), alpha=alpha).losses
        want = torch.tensor([plackett_luce_brute(r.tolist(), alpha) for r in rows], dtype=D)
        assert torch.allclose(got, want, atol=1e-10)


def test_ranked_all_permutations_sum_to_one():
    """PL probabilities of all n! orderings of the same responses sum to 1."""
    vals = [-1.0, -2.5, -0.2, -4.0]
    rows = torch.tensor(list(itertools.permutations(vals)), dtype=D)
    out = loss("spo_ranked", ListLogps(rows, torch.ones_like(rows)), alpha=0.8)
    assert out.stats["pref_prob"].sum().item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("name,pad_at", [("spo_best_of_n", 1), ("spo_best_of_n", 3),
                                         ("spo_ranked", 3), ("spo_ranked", 2)])
def test_padded_column_changes_nothing(name, pad_at):
    """A padded column (any value, even +100 or nan) leaves loss and stats unchanged, gets zero
    gradient, and the other gradients are those of the unpadded list."""
    base = [-1.0, -2.0, -3.0]
    ref = loss(name, lists([base]), alpha=0.7, gamma=1.5)
    ref.losses.sum().backward()
    for junk in (100.0, -1e6, float("nan")):
        row = base[:pad_at] + [junk] + base[pad_at:]
        mask = [[j != pad_at for j in range(4)]]
        lengths = [[1.0] * pad_at + [5.0] + [1.0] * (3 - pad_at)]
        lp = lists([row], mask=mask, lengths=lengths)
        out = loss(name, lp, alpha=0.7, gamma=1.5)
        out.losses.sum().backward()
        assert torch.allclose(out.losses, ref.losses, atol=1e-12)
        for key in ref.stats:
            assert torch.allclose(out.stats[key], ref.stats[key], atol=1e-12), key
        g = lp.policy_logps.grad[0]
        assert g[pad_at] == 0
        keep = [j for j in range(4) if j != pad_at]
        assert torch.allclose(g[keep], _grad(name, base), atol=1e-12)


def _grad(name, row):
    lp = lists([row])
    loss(name, lp, alpha=0.7, gamma=1.5).losses.sum().backward()
    return lp.policy_logps.grad[0]


def test_ragged_batch_rows_are_independent():
    """Rows with different numbers of valid responses give the losses of each row alone."""
    rows = [[-1.0, -2.0, -3.0, 0.0], [-0.5, -4.0, 0.0, 0.0]]
    mask = [[True, True, True, False], [True, True, False, False]]
    for name in ("spo_best_of_n", "spo_ranked"):
        both = loss(name, lists(rows, mask=mask), alpha=1.3).losses
        a = loss(name, lists([rows[0][:3]]), alpha=1.3).losses
        b = loss(name, lists([rows[1][:2]]), alpha=1.3).losses
        assert torch.allclose(both, torch.cat([a, b]), atol=1e-12)


def test_list_accuracy_is_strict():
    """Accuracy 1 only when the winner's logp is strictly the highest among valid columns."""
    rows = [[-1.0, -2.0, -0.5], [-1.0, -1.0, -3.0], [-1.0, -2.0, 5.0]]
    mask = [[True, True, True], [True, True, True], [True, True, False]]
    acc = loss("spo_best_of_n", lists(rows, mask=mask)).stats["rewards/accuracies"]
    assert acc.tolist() == [0.0, 0.0, 1.0]


# ---------------------------------------------------------------------------- weights mu


def test_weights_hand_value():
    """Example 1: logps (-2, -4), lengths (2, 2): s1 = -6/4 = -1.5; example 2: (-6, -6), lengths
    (3, 3): s2 = -12/6 = -2.  mean s = -1.75, s - mean = (0.25, -0.25).  gamma = 2:
    mu = (e^0.5, e^-0.5) / cosh(0.5) = (2 sigmoid(1), 2 sigmoid(-1)) = (1.462117, 0.537883)."""
    lp = ListLogps(torch.tensor([[-2.0, -4.0], [-6.0, -6.0]], dtype=D), torch.tensor([[2, 2], [3, 3]]))
    mu = L.spo_weights(lp, 2.0)
    assert mu.tolist() == pytest.approx([1.462117, 0.537883], abs=1e-6)
    plain = loss("spo", lp, alpha=0.5).losses
    weighted = loss("spo", lp, alpha=0.5, gamma=2.0)
    assert torch.allclose(weighted.losses, plain * mu, atol=1e-12)
    assert torch.equal(weighted.stats["weights"], mu)


def test_weights_mean_one_no_grad_and_gamma_zero():
    logp = (torch.randn(7, 4, dtype=D) * 5 - 10).requires_grad_()
    mask = torch.rand(7, 4) > 0.3
    mask[:, :2] = True
    lp = ListLogps(logp, torch.randint(1, 20, (7, 4)), mask)
    for gamma in (0.5, -1.0, 10.0):
        mu = L.spo_weights(lp, gamma)
        assert mu.mean().item() == pytest.approx(1.0, abs=1e-12)
        assert not mu.requires_grad and (mu > 0).all()
    assert torch.equal(L.spo_weights(lp, 0.0), torch.ones(7, dtype=D))


def test_weights_carry_no_gradient_into_loss():
    """grad of the weighted loss = mu * grad of the unweighted loss (mu is a constant)."""
    vals = torch.tensor([[-2.0, -4.0], [-6.0, -6.5], [-1.0, -0.2]], dtype=D)
    n = torch.tensor([[2, 3], [4, 3], [1, 1]])
    grads = []
    for gamma in (0.0, 1.7):
        lp = ListLogps(vals.clone().requires_grad_(), n)
        loss("spo", lp, alpha=0.9, gamma=gamma).losses.sum().backward()
        grads.append(lp.policy_logps.grad)
    mu = L.spo_weights(ListLogps(vals, n), 1.7)
    assert torch.allclose(grads[1], grads[0] * mu[:, None], atol=1e-12)


# ---------------------------------------------------------------------------- registry and stats

STAT_KEYS = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
             "logps/chosen", "logps/rejected", "pref_prob"}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_stats_present_detached_and_shaped(name):
    lp = pairs([-2.0, -1.0, -8.0], [-3.0, -4.0, -2.0], [-2.5, -1.2, -7.0], [-2.0, -3.0, -2.5],
               [3, 5, 4], [7, 2, 4])
    out = loss(name, lp, beta=0.3, gamma=0.5)
    assert out.losses.shape == (3,) and out.losses.requires_grad
    assert STAT_KEYS <= set(out.stats)
    for key, value in out.stats.items():
        assert value.shape == (3,) and not value.requires_grad, key
    assert torch.equal(out.stats["logps/chosen"], lp.policy_logps[:, 0].detach())
    if LOSSES[name].is_spo:
        assert "weights" in out.stats


def test_registry_metadata():
    spo = {n for n, s in LOSSES.items() if s.is_spo}
    assert spo == {"spo", "spo_best_of_n", "spo_ranked"}
    assert not any(LOSSES[n].needs_ref for n in spo | {"simpo", "cpo", "orpo"})
    assert all(LOSSES[n].needs_ref for n in ("dpo", "cdpo", "robust_dpo", "ipo", "hinge", "rdpo",
                                             "hdpo", "fdpo"))
    assert {LOSSES[n].data_kind for n in LOSSES} == {"pairs", "best_of_n", "ranked"}
    with pytest.raises(KeyError, match="unknown loss"):
        L.get_loss("nope")


def test_ref_free_losses_ignore_ref_and_ref_losses_use_it():
    a = pairs(-2.0, -3.0, -2.5, -2.5, 2, 4)
    b = pairs(-2.0, -3.0, -1.0, -9.0, 2, 4)
    for name, spec in LOSSES.items():
        if spec.data_kind != "pairs":
            continue
        same = torch.allclose(loss(name, a).losses, loss(name, b).losses)
        assert same != spec.needs_ref, name


def test_half_precision_is_promoted():
    lp = ListLogps(torch.tensor([[-2.0, -3.0]], dtype=torch.bfloat16), torch.ones(1, 2))
    out = loss("spo", lp, alpha=0.5)
    assert out.losses.dtype == torch.float32
    assert out.losses.item() == pytest.approx(0.948154, abs=1e-6)


def test_list_command_prints_registry(capsys):
    import argparse

    from softpo import commands

    parser = argparse.ArgumentParser()
    commands.losses_arguments(parser)
    assert commands.losses_command(parser.parse_args([])) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in LOSSES) and all(n in text for n in L.KL_ESTIMATORS)
    commands.losses_command(parser.parse_args(["--kind", "ranked"]))
    text = capsys.readouterr().out
    assert "spo_ranked" in text and "dpo " not in text
