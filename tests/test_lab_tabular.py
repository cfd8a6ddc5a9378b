"""The tabular lab: data distributions, the exact objective, its optimum, training, and the CLI.

Theory (DESIGN.md 1.2, softpo/lab/optima.py): under Bradley-Terry / Luce / Plackett-Luce data with
every pair covered, SPO at beta = 0 is minimised by softmax(r / alpha) whatever pi_ref is; DPO by
pi_ref exp(r / beta); SPO with beta > 0 by the minimiser of pref + beta KL(pi || pi_ref), found by
the solver. Problems are small (K <= 8) so that everything runs in seconds.
"""

import json
import math
from collections import Counter
from dataclasses import replace

import pytest
import torch

from softpo.cli import main
from softpo.lab import optima
from softpo.lab.tabular import LabConfig, one_thread, run, run_sweep, run_table
from softpo.losses import LossParams, get_loss

EXACT = LabConfig(k=5, contexts=2, n=3, pairs=0, steps=400, lr=0.1)  # full-batch, exact objective


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():  # tiny tensors: a second thread only adds contention
        yield


def solve(problem, name, alpha=1.0, beta=0.0, kind=None, sampler="uniform", n=3):
    """Solver on the exact objective, started from pi_ref (not from the answer)."""
    spec = get_loss(name)
    data = optima.enumerate_data(problem, kind or spec.data_kind, n, sampler)
    return optima.solve(problem, data, spec, LossParams(alpha=alpha, beta=beta), beta)


# -------------------------------------------------------------------------------------------- data


def test_pair_probabilities_by_hand():
    """K = 3, one context. Uniform sampler: each of the 3 unordered pairs has probability 1/3, and
    the ordered example (a > b) has (1/3) sigmoid(r_a - r_b). pi_ref sampler (two draws without
    replacement): P({a, b}) = p_a p_b / (1 - p_a) + p_b p_a / (1 - p_b)."""
    problem = optima.make_problem(1, 3, seed=3)
    r, p = problem.rewards[0], problem.ref_logps[0].exp()
    for sampler in ("uniform", "ref"):
        data = optima.enumerate_data(problem, "pairs", 2, sampler)
        assert len(data) == 6
        for (a, b), w in zip(data.resp.tolist(), data.weight):
            drawn = p[a] * p[b] * (1 / (1 - p[a]) + 1 / (1 - p[b]))
            pair = 1 / 3 if sampler == "uniform" else drawn
            assert w.item() == pytest.approx((pair * torch.sigmoid(r[a] - r[b])).item(), rel=1e-12)


@pytest.mark.parametrize("kind", ["pairs", "best_of_n", "ranked"])
@pytest.mark.parametrize("sampler", ["uniform", "ref"])
def test_sampled_data_follow_the_enumerated_distribution(kind, sampler):
    """Every sampled example's frequency is within 5 standard errors sqrt(w (1 - w) / N) of the
    probability the enumeration gives it (best-of-n: the losers compared as a set)."""
    problem = optima.make_problem(2, 4, seed=1)
    exact = optima.enumerate_data(problem, kind, 3, sampler)
    assert exact.weight.sum().item() == pytest.approx(1.0, abs=1e-12)
    count = 40_000
    sampled = optima.sample_data(problem, kind, count, 3, sampler, seed=2)

    def key(c, resp):
        return (c, resp[0], *(sorted(resp[1:]) if kind == "best_of_n" else resp[1:]))

    freq = Counter(key(c, r) for c, r in zip(sampled.ctx.tolist(), sampled.resp.tolist()))
    prob = {key(c, r): w for c, r, w in zip(exact.ctx.tolist(), exact.resp.tolist(),
                                           exact.weight.tolist())}
    assert set(freq) <= set(prob)
    for k, w in prob.items():
        assert abs(freq[k] / count - w) <= 5 * math.sqrt(w * (1 - w) / count)


# ------------------------------------------------------------------------------- exact optimisation

CONVERGENCE = [
    dict(loss="spo", alpha=0.5), dict(loss="spo", alpha=1.0), dict(loss="spo", alpha=2.0),
    dict(loss="spo_best_of_n", alpha=0.5), dict(loss="spo_ranked", alpha=2.0),
    dict(loss="spo_best_of_n", alpha=1.0, data="ranked"),  # a ranked list's head is a Luce winner
    dict(loss="spo_ranked", alpha=1.0, data="pairs"),  # Plackett-Luce over two is Bradley-Terry
    dict(loss="spo", alpha=1.0, gamma=2.0),  # weights mu > 0 leave the optimum in place
    dict(loss="spo", alpha=1.0, sampler="ref"), dict(loss="dpo", beta=0.5),
    dict(loss="dpo", beta=2.0, sampler="ref"),
]


@pytest.mark.parametrize("overrides", CONVERGENCE, ids=lambda o: "-".join(map(str, o.values())))
def test_exact_objective_training_reaches_closed_form(overrides):
    """Full-batch Adam on the exact expected objective lands on the closed-form optimum."""
    result = run(replace(EXACT, **overrides))
    assert result["target"] == "closed"
    assert result["kl_to_target"] < 1e-4
    assert result["entropy"] == pytest.approx(result["target_entropy"], abs=1e-3)


@pytest.mark.parametrize("name,kind", [("spo", None), ("spo_best_of_n", None), ("spo_ranked", None),
                                       ("spo_best_of_n", "ranked"), ("dpo", None)])
@pytest.mark.parametrize("sampler", ["uniform", "ref"])
@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_solver_equals_closed_form(name, kind, sampler, alpha):
    """Newton on the exact objective, from pi_ref, converges (|grad| < 1e-10) to the closed form
    (for DPO with beta = alpha)."""
    problem = optima.make_problem(2, 5, seed=4)
    beta = alpha if name == "dpo" else 0.0
    sol = solve(problem, name, alpha, beta, kind, sampler)
    assert sol.grad_norm < 1e-10 and sol.iterations > 2
    closed = optima.closed_form(name, problem, alpha, beta)
    assert optima.kl(sol.logps, closed).max().item() < 1e-12


def test_spo_optimum_ignores_reference_dpo_does_not():
    """Same rewards, two references; responses drawn from pi_ref, so even the data differ. SPO's
    minimiser is softmax(r/alpha) under both; DPO's moves with pi_ref as pi_ref exp(r/beta) says."""
    a = optima.make_problem(1, 6, seed=5)
    b = optima.Problem(a.rewards, torch.log_softmax(-2 * a.ref_logps, -1))
    spo_a, spo_b = (solve(p, "spo", 1.0, sampler="ref").logps for p in (a, b))
    assert optima.kl(spo_a, spo_b).item() < 1e-12
    assert optima.kl(spo_a, optima.spo_optimum(a, 1.0)).item() < 1e-12
    dpo_a, dpo_b = (solve(p, "dpo", beta=1.0, sampler="ref").logps for p in (a, b))
    assert optima.kl(dpo_a, dpo_b).item() > 0.05
    for problem, sol in ((a, dpo_a), (b, dpo_b)):
        assert optima.kl(sol, optima.dpo_optimum(problem, 1.0)).item() < 1e-12


def test_spo_with_kl_sits_between_softmax_and_reference():
    """theta_beta minimises f + beta g (f: preference loss, g = KL(pi || pi_ref)). Comparing the
    optimality of theta_b1, theta_b2 for b1 < b2: g(theta_beta) is non-increasing and f
    non-decreasing in beta, with g(theta_0) = KL(softmax(r/alpha) || pi_ref) and f(theta_0) = min f.
    The gradient of the exact objective vanishes at each solution."""
    problem = optima.make_problem(2, 5, seed=6)
    spec, data = get_loss("spo"), optima.enumerate_data(problem, "pairs", 2, "uniform")
    params = LossParams(alpha=1.0)

    def f_and_g(logps):
        f = optima.objective(logps, problem, data, spec, params, 0.0).item()
        return f, optima.kl(logps, problem.ref_logps).mean().item()

    f0, g0 = f_and_g(optima.spo_optimum(problem, 1.0))
    previous = (f0, g0)
    for beta in (0.1, 1.0, 10.0):
        sol = solve(problem, "spo", 1.0, beta, sampler="uniform")
        theta = sol.logps.clone().requires_grad_(True)
        value = optima.objective(theta, problem, data, spec, params, beta)
        assert torch.autograd.grad(value, theta)[0].norm().item() < 1e-9
        f, g = f_and_g(sol.logps)
        assert f > previous[0] and g < previous[1]
        previous = (f, g)
    assert previous[1] < 0.05 * g0  # beta = 10: close to pi_ref


def test_spo_with_kl_trained_to_solver_optimum():
    result = run(replace(EXACT, loss="spo", alpha=0.5, beta=0.5))
    assert result["target"] == "solver" and result["solver_grad_norm"] < 1e-10
    assert result["kl_to_target"] < 1e-4
    assert result["kl_to_spo_target"] > 0.01  # the KL term moved the optimum


# ------------------------------------------------------------------------------------- sampled data


def test_predicted_sampling_noise_matches_empirical_minimisers():
    """The expected KL of the empirical minimiser over N samples, tr(F H+ V H+)/(2N), against the
    mean over 16 data sets of the exact minimiser's KL (solver on the sample). The KL is roughly a
    weighted chi-square with K - 1 = 5 degrees of freedom: relative sd ~ sqrt(2/5) each, ~0.16 for
    the mean of 16, so [0.6, 1.6] x prediction is a ~2.5-sd band (plus the O(1/N^2) terms)."""
    problem = optima.make_problem(1, 6, seed=7)
    spec, params, count = get_loss("spo"), LossParams(alpha=0.5), 2000
    exact = optima.enumerate_data(problem, "pairs", 2, "uniform")
    target = optima.spo_optimum(problem, 0.5)
    predicted = optima.sampling_kl(problem, exact, spec, params, 0.0, target, count)
    kls = []
    for seed in range(16):
        data = optima.sample_data(problem, "pairs", count, 2, "uniform", seed)
        sol = optima.solve(problem, data, spec, params, 0.0, init=target)
        kls.append(optima.kl(sol.logps, target).item())
    assert 0.6 * predicted < sum(kls) / len(kls) < 1.6 * predicted


@pytest.mark.parametrize("loss,alpha", [("spo", 0.5), ("spo_ranked", 0.5), ("dpo", 1.0)])
def test_sampled_training_within_sampling_noise(loss, alpha):
    """Minibatch Adam on 16000 sampled examples (K = 8) reaches the optimum up to the data's own
    noise: KL < 5 x its first-order expectation (a weighted chi-square exceeds 5x its mean with
    probability <= P(chi2_1 > 5) = 2.5%), which here is itself < 0.01 nats."""
    cfg = LabConfig(loss=loss, alpha=alpha, k=8, pairs=16_000, steps=300, batch_size=1000, lr=0.1)
    result = run(cfg)
    assert result["expected_sampling_kl"] < 0.01 / 5
    assert result["kl_to_target"] < 5 * result["expected_sampling_kl"]


# ---------------------------------------------------------------------------------------------- CLI

SMALL = ["--k", "5", "--pairs", "0", "--steps", "300", "--lr", "0.1", "--no-plots"]


def test_json_output(capsys):
    assert main(["lab", "tabular", "--loss", "spo", "--alpha", "2", "--json", *SMALL]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    result = json.loads(out)
    for key in ("loss", "alpha", "beta", "k", "kl_to_target", "entropy", "target_entropy",
                "kl_to_spo_target", "data", "pairs", "steps", "seed", "seconds"):
        assert key in result
    assert (result["loss"], result["alpha"], result["beta"], result["k"]) == ("spo", 2.0, 0.0, 5)
    assert result["kl_to_target"] == result["kl_to_spo_target"] < 1e-4
    assert 0 < result["entropy"] < math.log(5)


def test_human_output_and_plot(capsys, tmp_path):
    args = ["lab", "tabular", "--loss", "dpo", *SMALL[:-1], "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "KL(pi || target)" in out and "closed form" in out
    assert (tmp_path / "probs.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_writes_plot_and_report(tmp_path):
    rows = run_sweep(LabConfig(k=4, pairs=0, steps=100, lr=0.1), tmp_path, echo=False)
    assert (tmp_path / "alpha_sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert [r["loss"] for r in rows].count("dpo") == [r["loss"] for r in rows].count("spo") > 2
    spo = [r["target_entropy"] for r in rows if r["loss"] == "spo"]
    assert spo == sorted(spo)  # entropy of softmax(r/alpha) rises with alpha
    assert "| dpo |" in (tmp_path / "report.md").read_text()


def test_table_runs_every_variant(tmp_path):
    rows = run_table(LabConfig(k=4, n=3, pairs=0, steps=300, lr=0.1), tmp_path, echo=False)
    assert [(r["loss"], r["alpha"]) for r in rows if r["loss"] != "dpo"] == [
        (name, a) for name in ("spo", "spo_best_of_n", "spo_ranked") for a in (0.5, 1.0, 2.0)]
    assert all(r["kl_to_target"] < 1e-4 for r in rows)
    assert "| spo_ranked |" in (tmp_path / "report.md").read_text()


BAD = [["--alpha", "0"], ["--alpha", "-1"], ["--alpha", "nan"], ["--beta", "-0.1"], ["--k", "1"],
       ["--loss", "nope"], ["--loss", "dpo", "--beta", "0"], ["--loss", "spo", "--data", "ranked"],
       ["--n", "9", "--k", "8"], ["--target", "closed", "--beta", "0.1"], ["--pairs", "-1"]]


@pytest.mark.parametrize("args", BAD, ids=" ".join)
def test_bad_arguments_exit_2_with_one_line(args, capsys):
    assert main(["lab", "tabular", *args, "--no-plots"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("softpo: error:") and captured.err.count("\n") == 1
