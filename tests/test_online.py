"""Online SPO (softpo/online.py) on tiny local models: rows sampled from the current policy and
labelled by an expert at refresh steps, the reward cache, how batches read the pool, every loss
with and without LoRA, one-line errors, and resume equal to the uninterrupted run."""

import copy
import statistics
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from softpo import checkpoint, cli
from softpo.collate import stream_indices
from softpo.config import load_config
from softpo.errors import UserError
from softpo.losses import LOSSES
from softpo.online import Online
from softpo.prefs import prompt_key
from softpo.tracking import read_metrics
from softpo.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data" / "prefs_tiny.jsonl"
CONFIG = ROOT / "configs" / "tiny.yaml"

# The tiny model answers in random bytes: the number of distinct characters rarely ties.
EXPERT = '''
CALLS = [0]
LIMIT = [{limit}]


def reward(prompt, response):
    CALLS[0] += 1
    if LIMIT[0] is not None and CALLS[0] > LIMIT[0]:
        {failure}
    return float(len(set(response)))
'''


@pytest.fixture
def expert(tmp_path, monkeypatch):
    """Write an expert module into tmp_path; returns a function(name, limit, failure) -> spec."""
    folder = tmp_path / "experts"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))

    def make(name="online_expert", limit=None, failure="raise ValueError('the expert is down')"):
        (folder / f"{name}.py").write_text(EXPERT.format(limit=limit, failure=failure))
        monkeypatch.delitem(sys.modules, name, raising=False)
        return f"{name}:reward"

    return make


def overrides(run: Path, **extra) -> list[str]:
    base = {
        "data.train": DATA, "data.max_length": 64, "data.max_prompt_length": 32,
        "data.eval_fraction": 0, "model.tiny.n_layer": 1, "model.tiny.n_embd": 32,
        "model.tiny.n_head": 2, "loss.beta": 0.0, "train.output_dir": run, "train.max_steps": 6,
        "train.batch_size": 4, "train.logging_steps": 1, "train.eval_steps": 0,
        "train.save_steps": 0, "train.progress": False, "train.report_to": "[jsonl]",
        "train.saturation_check": 0, "optim.lr": 1e-2, "optim.warmup_steps": 0,
        "regularizer.prompts_per_step": 2, "regularizer.max_new_tokens": 8,
        "online.enabled": True, "online.expert": "online_expert:reward", "online.every": 2,
        "online.prompts_per_refresh": 4, "online.sample_batch": 2, "online.responses": 3,
        "online.max_new_tokens": 8,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def trainer(run: Path, **extra) -> Trainer:
    return Trainer(load_config(CONFIG, overrides(run, **extra)))


def weights(t: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in t.acc.unwrap_model(t.scorer).state_dict().items()}


def is_in(items, pool) -> bool:
    return all(any(e is x for x in pool) for e in items)


# ---------------------------------------------------------------- a refresh


def test_rows_after_a_refresh_come_from_the_current_policy(tmp_path, expert):
    """The rows of the refresh at step 2 are those a fresh refresh draws from the policy as it
    was at step 2, not from the starting weights (same seeds), and step 2's batch reads them."""
    expert()
    t = trainer(tmp_path / "run")
    initial = copy.deepcopy(t.model)
    t.train_step(), t.train_step()
    at_refresh = copy.deepcopy(t.model)
    t.train_step()
    got = t.online.kept[-1]
    assert got.step == 2 and got.rows and t.online.last == 2

    def rows_from(policy) -> list[dict]:
        fresh = Online(t.cfg, t.online.prompts, t.tokenizer, scorer=t.online.scorer)
        fresh.refresh(policy, 2)
        return fresh.kept[-1].rows

    assert rows_from(at_refresh) == got.rows
    assert rows_from(initial) != got.rows
    assert is_in(t.micro_batch_items(2, 0), t.online.examples)
    texts = {r["chosen"] for r in got.rows} | {r["rejected"] for r in got.rows}
    assert not texts & {r["chosen"] for r in rows_from(initial)}


def test_each_distinct_answer_is_scored_once_across_refreshes(tmp_path, expert):
    expert()
    t = trainer(tmp_path / "run")
    calls = []

    def counting(prompts, responses):
        calls.extend((prompt_key(p), r) for p, r in zip(prompts, responses))
        return [float(len(set(r))) for r in responses]

    online = Online(t.cfg, t.online.prompts, t.tokenizer, scorer=counting)
    first = online.refresh(t.model, 0)
    assert len(calls) == len(set(calls)) == first["online/expert_calls"] > 0
    assert set(calls) == set(online.rewards)
    rows = online.kept[-1].rows
    again = online.refresh(t.model, 0)  # the same answers: all from the cache
    assert again["online/expert_calls"] == 0 and len(calls) == first["online/expert_calls"]
    assert online.kept[-1].rows == rows and again["online/rows"] == first["online/rows"]
    picks = stream_indices(len(online.prompts), 0, 4, t.cfg.train.seed + 2)
    answers = [(online.prompts[picks[i]], text) for i, texts, _ in
               online._sample(t.model, 0, picks, 0, 1, None) for text in texts if text.strip()]
    assert first["online/reward_mean"] == pytest.approx(  # every sample, repeats included
        statistics.fmean(online.rewards[prompt_key(p), text] for p, text in answers))


def test_two_processes_split_the_sampling_and_draw_what_one_draws(tmp_path, expert):
    """Prompt groups are shared out among processes and seeded by (seed, step, group): the two
    shares together are exactly one process's samples."""
    expert()
    t = trainer(tmp_path / "run", **{"online.prompts_per_refresh": 5})
    picks = list(range(5))
    one = t.online._sample(t.model, 4, picks, 0, 1, None)
    two = t.online._sample(t.model, 4, picks, 0, 2, None) + \
        t.online._sample(t.model, 4, picks, 1, 2, None)
    assert sorted(two) == one and [s[0] for s in one] == list(range(5))


@pytest.mark.parametrize("mix", ["replace", "append"])
def test_batches_read_offline_rows_before_the_first_refresh_then_the_pool(tmp_path, expert, mix):
    expert()
    t = trainer(tmp_path / "run", **{"online.start": 1, "online.mix": mix, "online.buffer": 2})
    t.train_step()  # step 0: offline rows only
    assert t.online.last is None and is_in(t.micro_batch_items(0, 0), t.train_set)
    t.train_step(), t.train_step(), t.train_step()  # refreshes at 1 and 3
    assert [r.step for r in t.online.kept] == [1, 3]
    assert len(t.online.examples) == sum(len(r.examples) for r in t.online.kept)
    items = [e for m in range(20) for e in t.micro_batch_items(3 + m, 0)]
    if mix == "replace":
        assert is_in(items, t.online.examples)
    else:
        assert is_in(items, t.train_set + t.online.examples)
        assert not is_in(items, t.online.examples) and not is_in(items, t.train_set)


# ---------------------------------------------------------------- losses, LoRA, no offline data


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_loss_trains_on_online_rows(tmp_path, expert, loss):
    """Two steps with a refresh at each; reference-based losses run the reference forward on the
    online rows. The loss's own row format is sampled."""
    expert()
    fmt = {"best_of_n": "best_of_n", "ranked": "ranked"}.get(LOSSES[loss].data_kind, "pairs")
    t = trainer(tmp_path / "run", **{"loss.name": loss, "loss.beta": 0.1 if loss != "spo" else 0.0,
                                     "train.max_steps": 2, "online.every": 1,
                                     "online.format": fmt})
    metrics = t.train()
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert t.online.last == 1 and t.online.examples[0].kind == fmt


def test_lora_run_with_online_rows_only(tmp_path, expert):
    """No offline data (data.train empty): training starts from the refresh at step 0, on the
    online prompt file with chat wrapping; LoRA with DPO (the reference is the adapter off) and
    SPO with the regulariser on."""
    expert()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Say a word."}\n{"prompt": "Name a colour."}\n')
    for loss, beta in (("dpo", 0.1), ("spo", 0.1)):
        run = tmp_path / loss
        t = trainer(run, **{"data.train": "", "online.prompts": prompts, "online.chat": True,
                            "lora.enabled": True, "lora.r": 4, "loss.name": loss,
                            "loss.beta": beta, "train.max_steps": 3})
        assert t.train_set == [] and t.online.prompts[0] == [{"role": "user",
                                                              "content": "Say a word."}]
        t.train()
        assert (run / "final" / "adapter_model.safetensors").is_file()
        logged = [r for r in read_metrics(run / "metrics.jsonl") if "online/rows" in r]
        assert [r["step"] for r in logged] == [0, 2]
        assert all({"online/reward_mean", "online/expert_calls"} <= set(r) for r in logged)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("extra, message", [
    ({"online.expert": "null"}, "config key 'online.expert': give exactly one of online.expert"),
    ({"online.reward_model": "some/model"}, "give exactly one of online.expert"),
    ({"online.responses": 1}, "config key 'online.responses': must be >= 2"),
    ({"online.mix": "blend"}, "config key 'online.mix': must be one of replace, append"),
    ({"online.format": "triples"}, "config key 'online.format': must be one of"),
    ({"online.start": 6}, "config key 'online.start': must be in [0, train.max_steps)"),
    ({"loss.name": "dpo", "loss.precompute_ref_logps": True},
     "config key 'loss.precompute_ref_logps': cannot be combined with online.enabled"),
    ({"online.format": "ranked"}, "config key 'online.format': loss 'spo' needs pairs data, "
                                  "not ranked rows"),
    ({"data.train": ""}, "config key 'online.prompts': give a prompt file"),
    ({"online.expert": "no_such_module:reward"}, "expert 'no_such_module:reward': cannot import"),
])
def test_bad_online_settings_are_one_line_exit_2(tmp_path, capsys, expert, extra, message):
    expert()
    code = cli.main(["train", str(CONFIG), *overrides(tmp_path / "run", **extra)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("failure, message", [
    ("raise ValueError('the expert is down')", "raised ValueError: the expert is down (prompt '"),
    ("return 'many'", "returned str 'many'; expected a number (prompt '"),
])
def test_failing_expert_is_one_line_keeps_the_checkpoint_and_resume_finishes_the_run(
        tmp_path, capsys, expert, failure, message):
    """The expert fails at a later refresh: one line naming the refresh step, the expert and the
    prompt, exit code 2, no final model, the last checkpoint complete. Resumed with a working
    expert (the same rewards), the run ends with the weights of a run that never failed."""
    good = expert("online_good")
    straight = tmp_path / "straight"
    assert cli.main(["train", str(CONFIG), *overrides(straight, **{
        "online.expert": good, "train.save_steps": 2})]) == 0
    # refreshes score at most 4 x 3 = 12 answers: the third refresh (step 4) goes past 24
    flaky = expert("online_flaky", limit=24, failure=failure)
    run = tmp_path / "run"
    args = ["train", str(CONFIG), *overrides(run, **{"online.expert": flaky,
                                                    "train.save_steps": 2})]
    capsys.readouterr()
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("softpo: error: online refresh at step 4: "
                                                   f"expert '{flaky}' ") and message in err, err
    last = checkpoint.latest_complete(run / "checkpoints")
    assert last is not None and last.name == "step-0000004" and (last / "online.json").is_file()
    assert not (run / "final").exists()
    assert cli.main(["train", str(CONFIG), *overrides(run, **{
        "online.expert": good, "train.save_steps": 2, "train.resume": True})]) == 0
    want = load_file(str(straight / "final" / "model.safetensors"))
    got = load_file(str(run / "final" / "model.safetensors"))
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    logged = [r for r in read_metrics(straight / "metrics.jsonl") if "online/rows" in r]
    assert [r["step"] for r in logged] == [0, 2, 4]
    assert all(r["online/expert_calls"] > 0 and r["online/rows"] > 0 for r in logged)


def test_no_rows_at_all_is_a_one_line_error(tmp_path, expert):
    (tmp_path / "experts" / "flat.py").write_text("def reward(prompt, response):\n    return 1.0\n")
    expert()
    t = trainer(tmp_path / "run", **{"online.expert": "flat:reward"})
    with pytest.raises(UserError, match="online refresh at step 0: no preference rows from 4 "
                                        "prompts \\(4 with all answers tied"):
        t.train_step()


# ---------------------------------------------------------------- resume


class Crash(Exception):
    pass


def test_crash_and_resume_equals_the_uninterrupted_run(tmp_path, expert):
    """Refreshes every 3 steps, checkpoints every 2, a pool of the last 2 refreshes mixed with
    the offline rows, the regulariser on: a run lost after step 4 and resumed from the step-4
    checkpoint (rows and rewards of the refreshes at 0 and 3 restored) ends bit for bit where
    the uninterrupted run ends, with the same online metrics."""
    expert()
    extra = {"train.max_steps": 8, "train.save_steps": 2, "online.every": 3, "online.buffer": 2,
             "online.mix": "append", "loss.beta": 0.1, "regularizer.sample_every": 2}
    straight = trainer(tmp_path / "a", **extra)
    straight.train()
    crashing = trainer(tmp_path / "b", **extra)
    original = crashing.train_step

    def step_then_crash():
        if crashing.step == 5:
            raise Crash
        return original()

    crashing.train_step = step_then_crash
    with pytest.raises(Crash):
        crashing.train()
    resumed = trainer(tmp_path / "b", **extra, **{"train.resume": True})
    assert resumed.resume() and resumed.step == 4
    assert [r.step for r in resumed.online.kept] == [0, 3]
    assert resumed.online.rewards == crashing.online.rewards
    resumed.train()
    want, got = weights(straight), weights(resumed)
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    assert resumed.online.rewards == straight.online.rewards

    def online_metrics(run):
        return [(r["step"], r["online/rows"], r["online/reward_mean"], r["online/expert_calls"])
                for r in read_metrics(run / "metrics.jsonl") if "online/rows" in r]

    assert [m[0] for m in online_metrics(tmp_path / "a")] == [0, 3, 6]
    assert online_metrics(tmp_path / "b") == online_metrics(tmp_path / "a")
