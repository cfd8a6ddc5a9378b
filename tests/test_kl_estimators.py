"""Global-KL estimators, checked by exact enumeration on a tiny autoregressive tabular model.

The policy has one logit row per prefix (vocabulary 3), the reference another random table.  Every
sequence is enumerated, so KL(pi || ref) and its gradient are exact (autograd).  The *expected*
gradient of an estimator with k samples per prompt is exact too: all N^k sample tuples are put in one
batch, one tuple per "prompt", and sum_tuples P(tuple) * surrogate[tuple].mean() is differentiated
with P(tuple) held constant (the samples carry no gradient).  No Monte Carlo anywhere.

Three processes: fixed length L = 2 and L = 3 (9 and 27 sequences) and L <= 3 with token 2 as EOS
(15 sequences, padded and masked after EOS).
"""

import itertools

import pytest
import torch

from softpo.losses import KL_ESTIMATORS, KL_NEEDS_TOKEN_KL, SampleLogps, exact_token_kl

V, EOS = 3, 2
D = torch.float64
PROCESSES = [("fixed", 2), ("fixed", 3), ("eos", 3)]


def sequences(kind, length):
    """All token sequences of the process, padded with 0 to `length`, and their masks."""
    if kind == "fixed":
        seqs = [list(s) for s in itertools.product(range(V), repeat=length)]
    else:  # stop at EOS or at the length cap
        seqs = [list(s) for n in range(1, length + 1) for s in itertools.product(range(V), repeat=n)
                if EOS not in s[:-1] and (s[-1] == EOS or n == length)]
    mask = torch.tensor([[t < len(s) for t in range(length)] for s in seqs], dtype=D)
    tokens = torch.tensor([s + [0] * (length - len(s)) for s in seqs])
    return tokens, mask


class Tabular:
    """pi(y_t | y_<t) = softmax(theta[prefix id]); same for the reference with its own table."""

    def __init__(self, kind, length, seed):
        self.tokens, self.mask = sequences(kind, length)  # (N, T)
        prefixes = {}
        ids = [[prefixes.setdefault(tuple(row[:t]), len(prefixes)) for t in range(length)]
               for row in self.tokens.tolist()]
        self.pid = torch.tensor(ids)  # (N, T) prefix id of each position (padding: any valid id)
        g = torch.Generator().manual_seed(seed)
        self.theta = torch.randn(len(prefixes), V, generator=g, dtype=D).requires_grad_()
        self.ref = torch.randn(len(prefixes), V, generator=g, dtype=D) * 1.5

    def token_logps(self, table):  # (N, T)
        return table.log_softmax(-1)[self.pid, self.tokens] * self.mask

    def token_kl(self, p_table, q_table):  # (N, T) exact per-position KL(p || q) along each prefix
        return exact_token_kl(p_table, q_table)[self.pid] * self.mask

    def seq_logps(self, table):  # (N,)
        return self.token_logps(table).sum(-1)

    def grad(self, scalar):
        return torch.autograd.grad(scalar, self.theta)[0]


@pytest.fixture(params=PROCESSES, ids=[f"{k}{n}" for k, n in PROCESSES])
def model(request):
    return Tabular(*request.param, seed=7)


def exact_kl(m):
    """KL(pi || ref) = sum_y pi(y) (log pi(y) - log ref(y)); differentiable."""
    lp = m.seq_logps(m.theta)
    return (lp.exp() * (lp - m.seq_logps(m.ref))).sum()


def exact_reverse_kl(m):
    """KL(ref || pi) = sum_y ref(y) (log ref(y) - log pi(y)); differentiable in pi."""
    lq = m.seq_logps(m.ref)
    return (lq.exp() * (lq - m.seq_logps(m.theta))).sum()


def frozen_prefix_token_kl(m):
    """E_{y ~ stopgrad pi} sum_t KL_t(theta): what the `token` estimator's gradient is unbiased for."""
    w = m.seq_logps(m.theta).exp().detach()
    return (w * m.token_kl(m.theta, m.ref).sum(-1)).sum()


def tuples(m, k):
    """All N^k tuples of k samples: SampleLogps with P = N^k prompts, and P(tuple) (no grad)."""
    n = m.tokens.shape[0]
    idx = torch.cartesian_prod(*[torch.arange(n)] * k).reshape(-1, k)  # (N^k, k)
    s = SampleLogps(m.token_logps(m.theta)[idx], m.token_logps(m.ref)[idx], m.mask[idx],
                    m.token_kl(m.theta, m.ref)[idx])
    prob = m.seq_logps(m.theta).exp().detach()[idx].prod(-1)  # (N^k,)
    return s, prob


def expected(m, surrogate_fn, k=2):
    """(E[grad surrogate.mean()], E[surrogate.mean()]) over k i.i.d. samples from pi."""
    s, prob = tuples(m, k)
    value = (prob * surrogate_fn(s).mean(-1)).sum()
    return m.grad(value), value.detach()


def assert_far(a, b, rel=1e-2):
    assert (a - b).norm() > rel * b.norm(), f"expected a clear difference, got {(a - b).norm()}"


# ---------------------------------------------------------------------------- sanity of the fixture


def test_enumeration_is_a_distribution(model):
    assert model.seq_logps(model.theta).exp().sum().item() == pytest.approx(1.0, abs=1e-12)
    assert model.seq_logps(model.ref).exp().sum().item() == pytest.approx(1.0, abs=1e-12)


def test_chain_rule_of_kl(model):
    """KL over sequences = E_y sum_t KL_t(y_<t): the identity the token estimators rest on."""
    assert frozen_prefix_token_kl(model).item() == pytest.approx(exact_kl(model).item(), abs=1e-12)


# ---------------------------------------------------------------------------- the estimators


@pytest.mark.parametrize("name", ["seq", "token_sf"])
def test_unbiased_estimators_match_exact_gradient(model, name):
    want = model.grad(exact_kl(model))
    got, _ = expected(model, lambda s: KL_ESTIMATORS[name](s).surrogate)
    assert torch.allclose(got, want, atol=1e-5)
    assert want.norm() > 1e-2  # the check is not vacuous


@pytest.mark.parametrize("name", ["seq", "token_sf"])
@pytest.mark.parametrize("k", [1, 3])
def test_unbiased_for_other_sample_counts(name, k):
    """k = 1 (no baseline) and k = 3 (leave-one-out over two others) are unbiased as well."""
    m = Tabular("eos", 3, seed=3) if k == 1 else Tabular("fixed", 2, seed=3)
    got, _ = expected(m, lambda s: KL_ESTIMATORS[name](s).surrogate, k=k)
    assert torch.allclose(got, m.grad(exact_kl(m)), atol=1e-5)


def test_token_estimator_is_biased_in_the_documented_way(model):
    """`token` is unbiased for grad of E_{y ~ stopgrad pi} sum_t KL_t, not for grad KL."""
    got, _ = expected(model, lambda s: KL_ESTIMATORS["token"](s).surrogate)
    assert torch.allclose(got, model.grad(frozen_prefix_token_kl(model)), atol=1e-10)
    assert_far(got, model.grad(exact_kl(model)))


@pytest.mark.parametrize("name", sorted(KL_ESTIMATORS))
def test_kl_outputs_are_unbiased_and_detached(model, name):
    s, prob = tuples(model, 2)
    out = KL_ESTIMATORS[name](s)
    assert out.surrogate.shape == out.kl.shape == prob.shape + (2,)
    assert not out.kl.requires_grad
    want = exact_kl(model).item()
    assert (prob * out.kl.mean(-1)).sum().item() == pytest.approx(want, abs=1e-10)
    # the surrogates' values are the KL estimates themselves (score terms are zero-valued)
    assert torch.allclose(out.surrogate.detach(), out.kl, atol=1e-12)


def test_token_estimators_need_token_kl():
    m = Tabular("fixed", 2, seed=0)
    s, _ = tuples(m, 2)
    s.token_kl = None
    assert KL_NEEDS_TOKEN_KL == {"token", "token_sf"}
    for name in KL_NEEDS_TOKEN_KL:
        with pytest.raises(ValueError, match="token_kl"):
            KL_ESTIMATORS[name](s)
    KL_ESTIMATORS["seq"](s)  # seq does not read it


def test_padding_values_are_ignored():
    """Garbage (even nan) after EOS changes neither surrogate nor gradient."""
    m = Tabular("eos", 3, seed=1)
    outs = {}
    for junk, name in itertools.product((0.0, float("nan")), KL_ESTIMATORS):
        s, prob = tuples(m, 2)
        pad = s.mask == 0
        dirty = SampleLogps(s.policy_token_logps.masked_fill(pad, junk),
                            s.ref_token_logps.masked_fill(pad, junk), s.mask,
                            s.token_kl.masked_fill(pad, junk))
        surrogate = KL_ESTIMATORS[name](dirty).surrogate
        outs.setdefault(name, []).append((surrogate.detach(), m.grad((prob * surrogate.mean(-1)).sum())))
    for name, ((s0, g0), (s1, g1)) in outs.items():
        assert torch.equal(s0, s1) and torch.allclose(g0, g1, atol=1e-12), name


# ---------------------------------------------------------------------------- the known traps


def test_plain_logratio_surrogate_has_zero_expected_gradient(model):
    """d/dtheta (logp - ref_logp) = grad logp, and E[grad logp] = grad sum_y pi(y) = 0."""
    got, value = expected(model, lambda s: ((s.policy_token_logps - s.ref_token_logps) * s.mask).sum(-1))
    assert got.abs().max() < 1e-12
    assert value.item() == pytest.approx(exact_kl(model).item(), abs=1e-10)  # right value, no gradient


def test_k3_surrogate_differentiates_the_other_kl(model):
    """f = e^u - u - 1, u = ref_logp - logp: grad f = (1 - ref/pi) grad logp, whose expectation
    sum_y (pi - ref) grad log pi = -sum_y ref grad log pi = grad KL(ref || pi)."""

    def k3(s):
        u = ((s.ref_token_logps - s.policy_token_logps) * s.mask).sum(-1)
        return u.exp() - u - 1

    got, _ = expected(model, k3)
    assert torch.allclose(got, model.grad(exact_reverse_kl(model)), atol=1e-10)
    assert_far(got, model.grad(exact_kl(model)))


def test_per_token_k1_summed_is_biased(model):
    """Per-token sampled k1, r_t = log pi_t - log ref_t.  Summed and differentiated directly it is the
    plain log-ratio (zero expected gradient, above).  Used as a per-token REINFORCE reward,
    sum_t stopgrad(r_t) grad log pi_t: E[r_t grad log pi_t | y_<t] = grad KL_t, so its expectation is
    the prefix-frozen gradient of `token`, not grad KL (the credit to earlier tokens is missing)."""
    got, _ = expected(model, lambda s: (((s.policy_token_logps - s.ref_token_logps) * s.mask).detach()
                                        * s.policy_token_logps * s.mask).sum(-1))
    assert torch.allclose(got, model.grad(frozen_prefix_token_kl(model)), atol=1e-10)
    assert_far(got, model.grad(exact_kl(model)))


def test_per_token_k3_summed_points_to_reverse_kl_per_position(model):
    """GRPO-style per-token k3, sum_t e^{u_t} - u_t - 1 with u_t = log ref_t - log pi_t: per position,
    E[(1 - ref_t/pi_t) grad log pi_t | y_<t] = grad KL(ref_t || pi_t); prefixes frozen, wrong direction."""

    def k3_tokens(s):
        u = (s.ref_token_logps - s.policy_token_logps) * s.mask
        return ((u.exp() - u - 1) * s.mask).sum(-1)

    got, _ = expected(model, k3_tokens)
    w = model.seq_logps(model.theta).exp().detach()
    target = (w * model.token_kl(model.ref, model.theta).sum(-1)).sum()  # E sum_t KL(ref_t || pi_t)
    assert torch.allclose(got, model.grad(target), atol=1e-10)
    assert_far(got, model.grad(exact_kl(model)))
    assert_far(got, model.grad(exact_reverse_kl(model)))


# ---------------------------------------------------------------------------- exact_token_kl


def test_exact_token_kl_hand_value():
    """p = softmax(0, 0) = (1/2, 1/2), q = softmax(0, log 3) = (1/4, 3/4):
    KL = 1/2 log 2 + 1/2 log(2/3) = 1/2 log(4/3) = 0.143841."""
    p = torch.zeros(2, 1, 2)  # (2, 1, V): two positions, identical policy rows
    q = torch.tensor([[[0.0, 0.0]], [[0.0, 1.0986123]]])  # log 3 = 1.0986123
    kl = exact_token_kl(p, q)
    assert kl.shape == (2, 1)
    assert kl[0, 0].item() == 0.0
    assert kl[1, 0].item() == pytest.approx(0.143841, abs=1e-6)


def test_exact_token_kl_half_input_computes_in_float32():
    logits = torch.randn(4, 50)
    ref = torch.randn(4, 50)
    full = exact_token_kl(logits, ref)
    half = exact_token_kl(logits.bfloat16(), ref.bfloat16())
    assert half.dtype == torch.float32
    assert torch.allclose(half, exact_token_kl(logits.bfloat16().float(), ref.bfloat16().float()))
    assert (full >= 0).all()
