"""`softpo lab sequence`: SPO and its baselines on a tiny transformer LM, measured exactly.

A LlamaForCausalLM over a 4-token vocabulary (letters `abc` + `<eos>`; by default responses of at
most 2 letters, |Y| = 13; `--max-len 3` gives |Y| = 40; see `softpo.lab.seqmodel`) is first fitted
to a known distribution (the reference), then aligned on preference data drawn from the reference
and labelled by a known expert reward r (Bradley-Terry / Luce / Plackett-Luce). Training is
`softpo train`'s own code path: a `softpo.trainer.Trainer` built from a `Config`, fed in-memory
tokenised examples, stepped by `train_step` (the registered loss on summed log-probs, and for SPO
with beta > 0 the global KL regulariser on fresh samples from `generate()`). Y is enumerable, so
every measurement is exact:
    kl_to_target        KL(pi_theta || softmax(r / alpha))      (SPO's optimum at beta = 0)
    kl_to_own_optimum   KL(pi_theta || the loss's own predicted optimum)  (`seqoptima`)
    entropy             H(pi_theta) in nats, against target_entropy = H(softmax(r / alpha))
    drift_mass          pi_theta(U) - pi_ref(U), U = the responses in no training example
    unseen_kl           KL(pi_theta(.|U) || pi_ref(.|U)), the change of shape within U
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from softpo.errors import UserError
from softpo.lab import one_thread, seqmodel, seqoptima
from softpo.losses import LOSSES, LossParams, get_loss

DATA_KINDS = ("pairs", "best_of_n", "ranked")
READABLE = {"pairs": ("pairs",), "best_of_n": DATA_KINDS, "ranked": ("pairs", "ranked")}
ESTIMATORS = ("token_sf", "seq", "token")
DPO_FAMILY_BETA = 1.0  # r ~ N(0, 1): DPO's pi_ref exp(r / 1) is on the scale of SPO's alpha = 1


@dataclass(frozen=True)
class SeqConfig:
    loss: str = "spo"
    alpha: float = 1.0
    beta: float | None = None  # None: 0 for the SPO family, DPO_FAMILY_BETA for the others
    data: str | None = None  # None: the loss's own kind
    n: int = 3  # responses per best-of-n / ranked list
    # Defaults measured across seeds 0-4 (docs/lab.md, "Robustness"): 50,000 pairs leave a data
    # floor of up to 0.005 nats at alpha 0.5 and batches of 256 a gradient noise of the same size;
    # Adam's default beta2 = 0.999 keeps a gradient spike's second moment for ~1000 steps, which
    # stalled one run at KL 0.52; and without warm-up, a jump at the peak learning rate in the
    # first 40 steps left one run on a plateau at KL 0.15 for the remaining 360.
    pairs: int = 200_000  # training examples
    steps: int = 400
    batch_size: int = 1024
    lr: float = 3e-3
    warmup_steps: int = 40  # linear warm-up, then cosine to 0
    adam_beta2: float = 0.99
    estimator: str = "token_sf"  # global-KL estimator (SPO with beta > 0)
    samples: int = 32  # fresh samples per step for the regulariser
    letters: str = "abc"
    max_len: int = 2
    reward_scale: float = 1.0
    ref_scale: float = 1.0
    sft_steps: int = 1000
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    eval_every: int = 50  # exact measurements along training (for the learning curves)
    seed: int = 0


def resolve(cfg: SeqConfig) -> SeqConfig:
    """Fill the loss-dependent defaults and check every value (UserError, before any work)."""
    if cfg.loss not in LOSSES:
        raise UserError(f"unknown loss '{cfg.loss}' (known: {', '.join(sorted(LOSSES))})")
    spec = get_loss(cfg.loss)
    beta = cfg.beta if cfg.beta is not None else (0.0 if spec.is_spo else DPO_FAMILY_BETA)
    cfg = replace(cfg, beta=beta, data=cfg.data or spec.data_kind)
    finite_pos = lambda x: math.isfinite(x) and x > 0  # noqa: E731
    checks = [
        (finite_pos(cfg.alpha), f"--alpha must be > 0 (got {cfg.alpha})"),
        (math.isfinite(beta) and beta >= 0, f"--beta must be >= 0 (got {beta})"),
        (spec.is_spo or beta > 0, f"--beta must be > 0 for '{cfg.loss}' (got {beta})"),
        (cfg.data in READABLE[spec.data_kind],
         f"loss '{cfg.loss}' reads {spec.data_kind} data; it cannot learn from --data {cfg.data}"),
        (cfg.data == "pairs" or 2 <= cfg.n <= 4, f"--n must be 2, 3 or 4 (got {cfg.n})"),
        (cfg.pairs >= 1, f"--pairs must be >= 1 (got {cfg.pairs})"),
        (cfg.steps >= 1, f"--steps must be >= 1 (got {cfg.steps})"),
        (cfg.batch_size >= 1, f"--batch-size must be >= 1 (got {cfg.batch_size})"),
        (finite_pos(cfg.lr), f"--lr must be > 0 (got {cfg.lr})"),
        (0 <= cfg.adam_beta2 < 1, f"--adam-beta2 must be in [0, 1) (got {cfg.adam_beta2})"),
        (0 <= cfg.warmup_steps < cfg.steps,
         f"--warmup-steps must be >= 0 and < --steps (got {cfg.warmup_steps})"),
        (cfg.estimator in ESTIMATORS, f"--estimator must be one of {', '.join(ESTIMATORS)}"),
        (cfg.samples >= 2, f"--samples must be >= 2 (got {cfg.samples})"),
        (1 <= cfg.max_len <= 5, f"--max-len must be between 1 and 5 (got {cfg.max_len})"),
        (2 <= len(cfg.letters) <= 6 and cfg.letters.isalpha() and cfg.letters.islower()
         and len(set(cfg.letters)) == len(cfg.letters),
         f"--letters must be 2 to 6 distinct lowercase letters (got '{cfg.letters}')"),
        (finite_pos(cfg.reward_scale), f"--reward-scale must be > 0 (got {cfg.reward_scale})"),
        (math.isfinite(cfg.ref_scale) and cfg.ref_scale >= 0,
         f"--ref-scale must be >= 0 (got {cfg.ref_scale})"),
        (cfg.sft_steps >= 1, f"--sft-steps must be >= 1 (got {cfg.sft_steps})"),
        (cfg.eval_every >= 1, f"--eval-every must be >= 1 (got {cfg.eval_every})"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    size = seqmodel.make_space(cfg.letters, cfg.max_len).size
    need = 2 if cfg.data == "pairs" else cfg.n
    if size < need or size > 2000:
        raise UserError(f"--letters/--max-len give {size} responses; need {need} to 2000")
    return cfg


def loss_params(cfg: SeqConfig) -> LossParams:
    return LossParams(alpha=cfg.alpha, beta=cfg.beta)


def trainer_config(cfg: SeqConfig, output_dir: str):
    """The `softpo train` config of this run (validated like any config file)."""
    from softpo.config import Config, validate

    c = Config()
    c.loss.name, c.loss.alpha, c.loss.beta, c.loss.gamma = cfg.loss, cfg.alpha, cfg.beta, 0.0
    c.regularizer.estimator, c.regularizer.prompts_per_step = cfg.estimator, 1
    c.regularizer.samples_per_prompt, c.regularizer.max_new_tokens = cfg.samples, cfg.max_len
    c.regularizer.sample_every = 1
    c.optim.lr, c.optim.warmup_steps, c.optim.scheduler = cfg.lr, cfg.warmup_steps, "cosine"
    c.optim.adam_betas = [0.9, cfg.adam_beta2]
    c.train.output_dir, c.train.max_steps = output_dir, cfg.steps
    c.train.batch_size = cfg.batch_size
    c.train.seed, c.train.report_to, c.train.progress = cfg.seed, [], False
    c.train.eval_steps = c.train.save_steps = 0
    c.data.max_length, c.data.max_prompt_length = 2 * cfg.max_len + 2, 1
    validate(c)
    return c


# ---------------------------------------------------------------------------------------- one run


@dataclass
class Setup:
    """What a run starts from: the world, the fitted reference model and its exact distribution."""

    world: seqmodel.World
    tokenizer: object
    scorer: seqmodel.Scorer
    reference: torch.nn.Module
    ref_logps: Tensor  # (Y,) exact
    sft_kl: float  # KL(p_sft || pi_ref) after fitting


_SETUPS: dict[tuple, Setup] = {}


def setup(cfg: SeqConfig) -> Setup:
    """Build (once per process and world) the reference by exact maximum likelihood."""
    key = (cfg.letters, cfg.max_len, cfg.reward_scale, cfg.ref_scale, cfg.sft_steps, cfg.n_layer,
           cfg.n_embd, cfg.n_head, cfg.seed)
    if key not in _SETUPS:
        space = seqmodel.make_space(cfg.letters, cfg.max_len)
        world = seqmodel.make_world(space, cfg.seed, cfg.reward_scale, cfg.ref_scale)
        tokenizer = seqmodel.make_tokenizer(cfg.letters)
        scorer = seqmodel.Scorer(space)
        model = seqmodel.build_model(tokenizer, cfg.seed, cfg.n_layer, cfg.n_embd, cfg.n_head)
        sft_kl = seqmodel.fit_reference(model, scorer, world.sft_logps, cfg.sft_steps)
        model.requires_grad_(False)
        _SETUPS[key] = Setup(world, tokenizer, scorer, model, scorer.exact(model), sft_kl)
    return _SETUPS[key]


def run(cfg: SeqConfig) -> dict:
    """Fit the reference, sample data, train through the Trainer, measure. JSON-able dict, plus
    `_policy`, `_target`, `_optimum`, `_ref`, `_seen`, `_curve` for the plots."""
    cfg = resolve(cfg)
    with one_thread():
        return _run(cfg)


def _run(cfg: SeqConfig) -> dict:
    import copy

    from softpo.trainer import Trainer

    start = time.perf_counter()
    s = setup(cfg)
    space, rewards = s.world.space, s.world.rewards
    data = seqoptima.sample_data(rewards, s.ref_logps, cfg.data, cfg.pairs, cfg.n, cfg.seed + 1)
    examples = [seqmodel.example(space, row.tolist(), cfg.data, i + 1)
                for i, row in enumerate(data.resp)]
    spec, params = get_loss(cfg.loss), loss_params(cfg)
    target = torch.log_softmax(rewards / cfg.alpha, 0)
    optimum = seqoptima.predicted_optimum(spec, params, cfg.data, cfg.n, rewards, s.ref_logps,
                                          space.lengths())
    curve = []
    t_train = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="softpo-lab-") as tmp:
        trainer = Trainer(trainer_config(cfg, tmp), tokenizer=s.tokenizer,
                          model=copy.deepcopy(s.reference).requires_grad_(True), examples=examples)
        for step in range(cfg.steps):
            if step % cfg.eval_every == 0:
                curve.append(_point(step, s.scorer.exact(trainer.policy), target, optimum))
            trainer.train_step()
        policy = s.scorer.exact(trainer.policy)
    train_seconds = time.perf_counter() - t_train
    curve.append(_point(cfg.steps, policy, target, optimum))
    result = measure(cfg, s, data, policy, target, optimum)
    result.update(train_seconds=round(train_seconds, 2),
                  seconds=round(time.perf_counter() - start, 2))
    return result | {"_policy": policy, "_target": target, "_optimum": optimum.logps,
                     "_ref": s.ref_logps, "_seen": seqoptima.seen(data, space.size),
                     "_curve": curve, "_strings": space.strings, "_rewards": rewards}


def _point(step: int, policy: Tensor, target: Tensor, optimum: seqoptima.Optimum) -> dict:
    own = None if optimum.logps is None else seqmodel.kl(policy, optimum.logps)
    return {"step": step, "kl_to_target": seqmodel.kl(policy, target), "kl_to_own_optimum": own,
            "entropy": seqmodel.entropy(policy)}


def measure(cfg: SeqConfig, s: Setup, data, policy: Tensor, target: Tensor,
            optimum: seqoptima.Optimum) -> dict:
    """Every exact number of a run (see the module docstring)."""
    kl, ent = seqmodel.kl, seqmodel.entropy
    unseen = ~seqoptima.seen(data, s.world.space.size)
    own = optimum.logps
    mass = lambda logps: float(logps.exp()[unseen].sum())  # noqa: E731
    return {
        "loss": cfg.loss, "alpha": cfg.alpha, "beta": cfg.beta, "data": cfg.data,
        "n": 2 if cfg.data == "pairs" else cfg.n,
        "kl_to_target": kl(policy, target), "entropy": ent(policy), "target_entropy": ent(target),
        "kl_to_own_optimum": None if own is None else kl(policy, own),
        "own_optimum_entropy": None if own is None else ent(own),
        "own_optimum": optimum.how, "solver_grad_norm": optimum.grad_norm,
        "own_optimum_kl_to_target": None if own is None else kl(own, target),
        "data_floor": data_floor(cfg, s, data, optimum),
        "ref_entropy": ent(s.ref_logps), "kl_to_ref": kl(policy, s.ref_logps),
        "ref_kl_to_target": kl(s.ref_logps, target),
        "expected_reward": float((policy.exp() * s.world.rewards).sum()),
        "unseen_responses": int(unseen.sum()), "unseen_mass_ref": mass(s.ref_logps),
        "unseen_mass": mass(policy), "drift_mass": mass(policy) - mass(s.ref_logps),
        "unseen_kl": conditional_kl(policy, s.ref_logps, unseen),
        "responses": s.world.space.size, "sft_kl": s.sft_kl, "pairs": cfg.pairs,
        "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "warmup_steps": cfg.warmup_steps,
        "adam_beta2": cfg.adam_beta2,
        "sft_steps": cfg.sft_steps,
        "estimator": cfg.estimator if get_loss(cfg.loss).is_spo and cfg.beta > 0 else None,
        "samples": cfg.samples, "seed": cfg.seed,
    }


def data_floor(cfg: SeqConfig, s: Setup, data, optimum: seqoptima.Optimum) -> float | None:
    """KL(empirical optimum || own optimum): what the finite data set alone leaves, the minimiser
    of the loss on exactly the sampled examples (a policy over Y, by the solver) measured against
    the population optimum. A trained policy cannot be expected below it. None without an optimum
    or for large worlds (> 400 responses)."""
    if optimum.logps is None or s.world.space.size > 400:
        return None
    spec, params = get_loss(cfg.loss), loss_params(cfg)
    fit = seqoptima.solve(spec, params, data, s.ref_logps.to(seqoptima.DTYPE),
                          s.world.space.lengths(), optimum.logps)
    return seqmodel.kl(fit.logps, optimum.logps)


def conditional_kl(logps: Tensor, ref_logps: Tensor, subset: Tensor) -> float | None:
    """KL(pi(.|U) || pi_ref(.|U)) within the responses U of `subset` (both renormalised on U):
    how much the shape of the mass on U changed, whatever its total.  None when U is empty."""
    if not subset.any():
        return None
    restrict = lambda lp: lp[subset] - lp[subset].logsumexp(0)  # noqa: E731
    return seqmodel.kl(restrict(logps), restrict(ref_logps))


def public(result: dict) -> dict:
    return {k: v for k, v in result.items() if not k.startswith("_")}
