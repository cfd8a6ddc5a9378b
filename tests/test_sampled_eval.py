"""softpo/sampled_eval.py and `softpo eval ... --prompts`: pass@k, self-similarity and the summary
by hand; the command on saved tiny models (one table, the same samples whatever the company, the
expert called once per distinct pair, files that agree with the printed numbers); bad input is one
line, exit code 2 and nothing written."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from softpo import cli
from softpo.evaluation import DrawnSamples, distinct_successes, pass_at_k, self_similarity
from softpo.sampled_eval import ExpertCache, EvalSettings, summarize

EXPERT = '''
CALLS = []


def reward(prompt, response):
    """1 for a response with an even number of characters, else 0.25."""
    CALLS.append((str(prompt), response))
    return 1.0 if len(response) % 2 == 0 else 0.25


def words(prompt, response):
    return "many"
'''


def test_pass_at_k_hand_values_and_brute_force():
    """n = 4 samples, c = 1 success: pass@1 = 1/4, pass@2 = 1 - C(3,2)/C(4,2) = 1/2, pass@4 = 1;
    n = 5, c = 2: pass@3 = 1 - C(3,3)/C(5,3) = 9/10. Every (n, c, k) up to n = 6 equals the share
    of k-subsets of the samples that hold a success."""
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)
    assert pass_at_k(3, 0, 2) == 0.0
    for n in range(1, 7):
        for c in range(n + 1):
            outcomes = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcomes, k))
                assert pass_at_k(n, c, k) == pytest.approx(sum(map(any, subsets)) / len(subsets))
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_distinct_successes_hand_values():
    """Right answers "July", "july." and " July " are one answer, "June" another; a wrong "May"
    does not count: 2. No success: 0."""
    texts = ["July", "july.", " July ", "June", "May"]
    assert distinct_successes(texts, [True, True, True, True, False]) == 2
    assert distinct_successes(texts, [False] * 5) == 0
    assert distinct_successes(["4", "4.", "four"], [True] * 3) == 2


def test_self_similarity_hand_values():
    """Word sets {a, b}, {a, c}, {a, b}: Jaccard 1/3, 1, 1/3 over the three pairs -> 5/9. Two
    empty responses are identical (1); one sample has no pair (NaN)."""
    assert self_similarity(["a b", "a c", "b a"]) == pytest.approx(5 / 9)
    assert self_similarity(["x y", "z"]) == 0.0
    assert self_similarity(["", ""]) == 1.0
    assert math.isnan(self_similarity(["a"]))


def test_summary_by_hand():
    """P = 2 prompts, k = 3 samples. Rewards (1, 0, 1 | 0, 0, 0.5), threshold 1:
    mean 2.5/6; prompt means 2/3 and 1/6, se = sd(2/3, 1/6) / sqrt(2) = 0.25; successes 2 and 0:
    pass@1 = (2/3 + 0) / 2, pass@2 = (1 + 0) / 2, pass@3 = 1/2. Log-probs (-1, -2, -3 | -4, -5, -6),
    reference all -2: KL = mean(1, 0, -1, -2, -3, -4) = -1.5 (a Monte Carlo estimate can be
    negative), entropy 3.5, reference NLL per token 12 / 28 (the lengths sum to 28). distinct-1: prompt 1 "a b", "a", "c" -> 3 of 4 words, prompt 2 "d d"
    x 3 -> 1 of 6. self-sim: prompt 1 pairs 1/2, 0, 0 -> 1/6; prompt 2 -> 1. Different right
    answers: prompt 1 "a b" and "c", prompt 2 none -> 1."""
    drawn = DrawnSamples(owners=[0, 0, 0, 1, 1, 1], texts=["a b", "a", "c", "d d", "d d", "d d"],
                         lengths=torch.tensor([2, 3, 4, 5, 6, 8]),
                         finished=torch.tensor([True, True, True, True, False, False]),
                         policy_logps=torch.tensor([-1.0, -2, -3, -4, -5, -6]),
                         ref_logps=torch.full((6,), -2.0))
    rewards = [1.0, 0.0, 1.0, 0.0, 0.0, 0.5]
    m = summarize("m", drawn, rewards, 2, EvalSettings(k=3, success_threshold=1.0))
    assert m.reward == pytest.approx(2.5 / 6)
    assert m.reward_sd == pytest.approx(torch.tensor(rewards).std().item())
    assert m.reward_se == pytest.approx(0.25)
    assert m.success == pytest.approx(2 / 6)
    assert m.pass_at == pytest.approx({1: 1 / 3, 2: 0.5, 3: 0.5})
    assert (m.kl, m.entropy) == (pytest.approx(-1.5), pytest.approx(3.5))
    assert m.ref_nll == pytest.approx(12 / 28)
    assert m.distinct_1 == pytest.approx((3 / 4 + 1 / 6) / 2)
    assert m.distinct_2 == pytest.approx((1 + 1 / 3) / 2)  # "a b" | "d d" x 3: 1 of 3
    assert m.self_similarity == pytest.approx((1 / 6 + 1) / 2)
    assert (m.length, m.truncated) == (pytest.approx(28 / 6), pytest.approx(2 / 6))
    assert m.distinct_correct == pytest.approx(1.0)
    hot = summarize("m", drawn, rewards, 2, EvalSettings(k=3, temperature=0.7))
    assert hot.kl is None and hot.entropy is None  # another distribution than the model's
    assert hot.ref_nll == pytest.approx(12 / 28)  # the reference scores whatever was sampled


def test_the_expert_is_called_once_per_distinct_pair():
    seen = []

    def scorer(prompts, responses):
        seen.extend(zip(map(str, prompts), responses))
        return [float(len(r)) for r in responses]

    cache = ExpertCache(scorer)
    chat = [{"role": "user", "content": "p"}]
    assert cache(["p", "p", chat, "p"], ["ab", "ab", "ab", "c"]) == [2.0, 2.0, 2.0, 1.0]
    assert cache(["p", chat], ["ab", "xyz"]) == [2.0, 3.0]
    assert seen == [("p", "ab"), (str(chat), "ab"), ("p", "c"), (str(chat), "xyz")]


# ---------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two saved tiny models, and the LoRA folder softpo's final/ writes (adapter + base/)."""
    from peft import LoraConfig, get_peft_model

    from softpo.config import TinyModelConfig
    from softpo.models import build_tiny_model, byte_tokenizer, save_pretrained_atomic

    root, tok = tmp_path_factory.mktemp("models"), byte_tokenizer()
    cfg = TinyModelConfig(n_layer=1, n_embd=32, n_head=2)
    for seed in (1, 2):
        save_pretrained_atomic(build_tiny_model(cfg, tok, seed=seed), tok, root / f"m{seed}")
    lora = get_peft_model(build_tiny_model(cfg, tok, seed=1),
                          LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_pretrained_atomic(lora, tok, root / "lora", base_model=build_tiny_model(cfg, tok, seed=1))
    return root


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Prompts (a string, a conversation) and the expert module, importable by name."""
    (tmp_path / "evalexpert.py").write_text(EXPERT)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "evalexpert", raising=False)
    rows = [{"prompt": "Say a word."}, {"prompt": [{"role": "user", "content": "Count to 3."}]},
            {"prompt": "Name a colour."}]
    (tmp_path / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def _eval(capsys, *argv) -> dict:
    assert cli.main(["eval", *map(str, argv), "--json", "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_compares_models_on_the_same_samples(models, workdir, capsys):
    """Two models and the reference in one call: one row per model; the reference's KL to itself
    is exactly 0; the files hold every sample with the expert's reward, and the summary's numbers
    are those of the samples; each model draws the same samples alone as in company; the expert
    saw each distinct (prompt, response) once."""
    import evalexpert

    out = workdir / "out"
    got = _eval(capsys, models / "m1", models / "m2", "--prompts", workdir / "heldout.jsonl",
                "--expert", "evalexpert:reward", "-n", 4, "--max-new-tokens", 6,
                "--ref", models / "m1", "--out", out)
    assert [m["model"] for m in got["models"]] == [str(models / "m1"), str(models / "m2")]
    first, second = got["models"]
    assert first["kl"] == 0.0 and second["kl"] > 0
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 3 * 4
    assert json.loads((out / "summary.json").read_text()) == got
    assert "| model | reward |" in (out / "summary.md").read_text()
    for summary in got["models"]:
        mine = [r for r in records if r["model"] == summary["model"]]
        rewards = [r["reward"] for r in mine]
        assert rewards == [1.0 if len(r["response"]) % 2 == 0 else 0.25 for r in mine]
        assert summary["reward"] == pytest.approx(sum(rewards) / len(rewards))
        assert summary["success"] == pytest.approx(sum(r == 1.0 for r in rewards) / len(rewards))
        assert summary["entropy"] == pytest.approx(-sum(r["logp"] for r in mine) / len(mine))
        assert summary["kl"] == pytest.approx(sum(r["logp"] - r["ref_logp"] for r in mine)
                                              / len(mine), abs=1e-6)
        assert summary["ref_nll"] == pytest.approx(-sum(r["ref_logp"] for r in mine)
                                                   / sum(r["tokens"] for r in mine))
        assert summary["truncated"] == pytest.approx(sum(r["truncated"] for r in mine) / len(mine))
        hits = [sum(r["success"] for r in mine if r["prompt_index"] == i) for i in range(3)]
        assert summary["pass@2"] == pytest.approx(sum(pass_at_k(4, c, 2) for c in hits) / 3)
    distinct = {(json.dumps(r["prompt"]), r["response"]) for r in records}
    assert len(evalexpert.CALLS) == len(distinct)

    alone = _eval(capsys, models / "m2", "--prompts", workdir / "heldout.jsonl", "--expert",
                  "evalexpert:reward", "-n", 4, "--max-new-tokens", 6, "--out", workdir / "alone")
    solo = [json.loads(line)
            for line in (workdir / "alone" / "samples.jsonl").read_text().splitlines()]
    assert [r["response"] for r in solo] == \
        [r["response"] for r in records if r["model"] == str(models / "m2")]
    assert alone["models"][0]["kl"] is None and alone["models"][0]["ref_nll"] is None  # no ref


def test_eval_prints_one_table_and_reads_a_lora_folder(models, workdir, capsys):
    """The LoRA folder loads with its base (base/ inside it) and differs from that base: its KL
    to the base is positive. --temperature other than 1 reports no KL or entropy."""
    assert cli.main(["eval", str(models / "lora"), str(models / "m1"), "--prompts",
                     str(workdir / "heldout.jsonl"), "--expert", "evalexpert:reward", "-n", "2",
                     "--max-new-tokens", "4", "--ref", str(models / "m1"), "--chat",
                     "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("3 prompts x 2 samples per model, pure sampling, seed 0")
    assert lines[1].startswith("| model | reward | se | sd | success | pass@1 | pass@2 |")
    lora_row, base_row = lines[3].split(" | "), lines[4].split(" | ")
    assert len(lines) == 5 and lora_row[0] == f"| {models / 'lora'}"
    assert float(lora_row[-3]) > 0 and base_row[-3] == "0"  # KL to ref (m1 = the LoRA's base)
    assert float(lora_row[-1].rstrip(" |")) > 0  # the reference's NLL per token of the samples
    hot = _eval(capsys, models / "m1", "--prompts", workdir / "heldout.jsonl", "--expert",
                "evalexpert:reward", "-n", 2, "--max-new-tokens", 4, "--ref", models / "m1",
                "--temperature", 0.5)
    assert hot["models"][0]["kl"] is None and hot["models"][0]["entropy"] is None
    assert hot["settings"]["temperature"] == 0.5


@pytest.mark.parametrize("case, message", [
    ("no_prompt_field", "heldout_bad.jsonl:1: field 'prompt': missing"),
    ("unknown_module", "expert 'nosuchexpert:reward': cannot import 'nosuchexpert'"),
    ("not_a_number", "expert 'evalexpert:words' returned str 'many'; expected a number"),
    ("not_a_model", "not a model folder (no config.json or adapter_config.json)"),
    ("two_sources", "give exactly one of --data FILE, --candidates FILE or --prompts FILE"),
    ("bad_temperature", "--temperature must be > 0"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, message, models, workdir, capsys):
    (workdir / "heldout_bad.jsonl").write_text('{"question": "Say a word."}\n')
    (workdir / "empty_folder").mkdir()
    (workdir / "empty_folder" / "notes.txt").write_text("not a model")
    out = workdir / "out"
    model, prompts, expert = models / "m1", workdir / "heldout.jsonl", "evalexpert:reward"
    extra = []
    if case == "no_prompt_field":
        prompts = workdir / "heldout_bad.jsonl"
    elif case == "unknown_module":
        expert = "nosuchexpert:reward"
    elif case == "not_a_number":
        expert = "evalexpert:words"
    elif case == "not_a_model":
        extra = [str(workdir / "empty_folder")]
    elif case == "two_sources":
        extra = ["--data", str(workdir / "heldout.jsonl")]
    elif case == "bad_temperature":
        extra = ["--temperature", "0"]
    code = cli.main(["eval", str(model), *extra, "--prompts", str(prompts), "--expert", expert,
                     "-n", "2", "--max-new-tokens", "4", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("softpo: error: ") and message in err, err
    assert not out.exists()


def test_a_failed_write_leaves_no_file_and_no_new_folder(tmp_path, monkeypatch):
    """A failure after the temporary files are written (here: the first rename) removes them, and
    the folder too when this call created it; an existing folder keeps only what it had."""
    from softpo import sampled_eval

    def fail(src, dst):
        raise OSError("No space left on device")

    monkeypatch.setattr(sampled_eval.os, "replace", fail)
    with pytest.raises(OSError):
        sampled_eval.write_outputs(tmp_path / "new", [{"reward": 1.0}], {"models": []}, "# x\n")
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "mine.txt").write_text("kept")
    with pytest.raises(OSError):
        sampled_eval.write_outputs(tmp_path / "old", [{"reward": 1.0}], {"models": []}, "# x\n")
    assert [p.name for p in (tmp_path / "old").iterdir()] == ["mine.txt"]
