"""`softpo build-prefs`: labelling statistics, the three formats end to end on the tiny model (read
back by softpo.data), the summary, and a sequence-classification reward model as the expert."""

import json
import math
import random
from collections import Counter

import pytest
import torch

from softpo.cli import main
from softpo.config import DataConfig
from softpo.data import load_preferences
from softpo.prefs import (bt_probability, build_preferences, distinct_responses, has_tie,
                          label_best, label_pairs, label_ranking, make_rows, summary_path,
                          write_atomic)

N_DRAWS = 20000  # binomial sd at p = 0.5 is 0.0035; tolerances below are >= 4 sd


# ---------------------------------------------------------------- labelling

def test_bt_probability_hand_values_and_no_overflow():
    """sigmoid((r_a - r_b) / T): sigmoid(1) = 1 / (1 + e^-1) = 0.7310585786; symmetric."""
    assert bt_probability(1.0, 0.0, 1.0) == pytest.approx(0.7310585786, abs=1e-10)
    assert bt_probability(0.0, 0.5, 0.25) == pytest.approx(1 / (1 + math.e ** 2), abs=1e-12)
    assert bt_probability(0.3, 0.3, 0.1) == 0.5
    assert bt_probability(0.0, 1000.0, 1e-3) == 0.0 and bt_probability(1000.0, 0.0, 1e-3) == 1.0


def test_bt_pair_labels_follow_the_sigmoid():
    """One untied pair, r = (0, 0.5), T = 0.25: P(response 0 wins) = sigmoid(-2) = 0.1192."""
    rng = random.Random(0)
    wins = sum(label_pairs([0.0, 0.5], "bt", 0.25, rng) == [(0, 1)] for _ in range(N_DRAWS))
    assert wins / N_DRAWS == pytest.approx(1 / (1 + math.e ** 2), abs=0.01)


def test_luce_best_follows_the_softmax():
    """r = (0, 1, 2), T = 1: P(best = i) = e^i / (1 + e + e^2) = 0.0900, 0.2447, 0.6652."""
    rng = random.Random(1)
    counts = Counter(label_best([0.0, 1.0, 2.0], "bt", 1.0, rng) for _ in range(N_DRAWS))
    z = 1 + math.e + math.e ** 2
    for i in range(3):
        assert counts[i] / N_DRAWS == pytest.approx(math.e ** i / z, abs=0.015)


def test_plackett_luce_rankings_follow_their_law():
    """r = (0, 1, 2), T = 1: P(2 > 1 > 0) = e^2 / (1 + e + e^2) * e / (1 + e) = 0.4863 and
    P(0 > 1 > 2) = 1 / (1 + e + e^2) * e / (e + e^2) = 0.0242."""
    rng = random.Random(2)
    counts = Counter(tuple(label_ranking([0.0, 1.0, 2.0], "bt", 1.0, rng)) for _ in range(N_DRAWS))
    e = math.e
    assert counts[(2, 1, 0)] / N_DRAWS == pytest.approx(e ** 2 / (1 + e + e ** 2) * e / (1 + e),
                                                        abs=0.015)
    assert counts[(0, 1, 2)] / N_DRAWS == pytest.approx(1 / (1 + e + e ** 2) * e / (e + e ** 2),
                                                        abs=0.01)


def test_temperature_sharpens_bt_labels():
    """T = 0.05 on r = (0, 0.5): P(0 wins) = sigmoid(-10) = 4.5e-5, so 2000 draws without a win
    for response 0 have probability 0.91 (at T = 1 it would be 0.38 per draw)."""
    rng = random.Random(3)
    assert all(label_pairs([0.0, 0.5], "bt", 0.05, rng) == [(1, 0)] for _ in range(2000))


def test_best_worst_is_deterministic_except_for_ties():
    rng = random.Random(4)
    pairs = Counter(tuple(label_pairs([1.0, 1.0, 0.0, 0.5], "best-worst", 1.0, rng)) for _ in
                    range(400))
    assert set(pairs) == {((0, 2),), ((1, 2),)}  # best tied between 0 and 1, worst always 2
    assert label_best([0.2, 0.9, 0.1], "best-worst", 1.0, rng) == 1
    assert label_ranking([0.2, 0.9, 0.1], "best-worst", 1.0, rng) == [1, 0, 2]


def test_pairs_skip_ties_and_all_tie_prompts_give_no_rows():
    rng = random.Random(5)
    got = label_pairs([1.0, 1.0, 0.0], "bt", 1.0, rng, pairs_per_prompt=0)
    assert sorted(tuple(sorted(p)) for p in got) == [(0, 2), (1, 2)]  # never (0, 1): a tie
    assert len(label_pairs([0.0, 1.0, 2.0, 3.0], "bt", 1.0, rng, pairs_per_prompt=2)) == 2
    for fmt in ("pairs", "best_of_n", "ranked"):
        assert make_rows("p", ["a", "b"], [0.5, 0.5], fmt, "bt", 1.0, rng) == []
        assert make_rows("p", ["a"], [0.5], fmt, "bt", 1.0, rng) == []


# ---------------------------------------------------------------- --keep-ties

def test_keep_ties_bt_draws_among_all_pairs_and_labels_a_tie_by_a_fair_coin():
    """r = (1, 1, 0), T = 1, all pairs: (0, 1) is a tie, labelled by sigmoid(0) = 1/2; (0, 2) and
    (1, 2) by sigmoid(1) = 0.7311.  One pair per prompt: each of the 3 pairs has probability 1/3."""
    rng = random.Random(6)
    draws = [label_pairs([1.0, 1.0, 0.0], "bt", 1.0, rng, 0, keep_ties=True) for _ in range(N_DRAWS)]
    assert all(sorted(tuple(sorted(p)) for p in d) == [(0, 1), (0, 2), (1, 2)] for d in draws)
    tie_winners = Counter(w for d in draws for w, l in d if {w, l} == {0, 1})
    assert tie_winners[0] / N_DRAWS == pytest.approx(0.5, abs=0.015)
    zero_beats_two = sum((0, 2) in d for d in draws) / N_DRAWS
    assert zero_beats_two == pytest.approx(1 / (1 + math.exp(-1)), abs=0.015)
    one = Counter(tuple(sorted(label_pairs([1.0, 1.0, 0.0], "bt", 1.0, rng, 1, keep_ties=True)[0]))
                  for _ in range(N_DRAWS))
    assert one[(0, 1)] / N_DRAWS == pytest.approx(1 / 3, abs=0.015)


def test_keep_ties_best_worst_adds_a_coin_labelled_pair_of_tied_best_responses():
    """r = (1, 1, 0, 1): the (best, worst) pair as before (worst is 2), then two of the three tied
    best responses {0, 1, 3}, each of the 6 ordered pairs with probability 1/6 (a uniform pair, a
    fair coin for its order).  A lone best response gives no extra pair; nor does default mode."""
    rng = random.Random(7)
    draws = [label_pairs([1.0, 1.0, 0.0, 1.0], "best-worst", 1.0, rng, keep_ties=True)
             for _ in range(N_DRAWS)]
    assert all(len(d) == 2 and d[0][1] == 2 and d[0][0] in (0, 1, 3) for d in draws)
    tied = Counter(d[1] for d in draws)
    assert set(tied) == {(i, j) for i in (0, 1, 3) for j in (0, 1, 3) if i != j}
    for pair in tied:
        assert tied[pair] / N_DRAWS == pytest.approx(1 / 6, abs=0.01)
    assert label_pairs([1.0, 0.5, 0.0], "best-worst", 1.0, rng, keep_ties=True) == [(0, 2)]
    assert len(label_pairs([1.0, 1.0, 0.0], "best-worst", 1.0, rng)) == 1


def test_keep_ties_all_tie_prompts_give_coin_labelled_rows_in_every_format():
    """All rewards equal: a pair in fair-coin order (bt and best-worst), a uniformly random best
    (Luce with equal weights) and a uniformly random ranking (Plackett-Luce with equal weights: each
    of the 3! orders 1/6)."""
    rng = random.Random(8)
    texts, rewards = ["a", "b", "c"], [0.5, 0.5, 0.5]
    for pairing in ("bt", "best-worst"):
        rows = [make_rows("p", texts[:2], rewards[:2], "pairs", pairing, 1.0, rng, keep_ties=True)
                for _ in range(N_DRAWS)]
        assert all(len(r) == 1 and r[0]["chosen_reward"] == r[0]["rejected_reward"] for r in rows)
        assert sum(r[0]["chosen"] == "a" for r in rows) / N_DRAWS == pytest.approx(0.5, abs=0.015)
        best = Counter(make_rows("p", texts, rewards, "best_of_n", pairing, 1.0, rng,
                                 keep_ties=True)[0]["best"] for _ in range(N_DRAWS))
        assert all(best[i] / N_DRAWS == pytest.approx(1 / 3, abs=0.015) for i in range(3))
        ranks = Counter(tuple(make_rows("p", texts, rewards, "ranked", pairing, 1.0, rng,
                                        keep_ties=True)[0]["ranking"]) for _ in range(N_DRAWS))
        assert len(ranks) == 6 and all(v / N_DRAWS == pytest.approx(1 / 6, abs=0.015)
                                       for v in ranks.values())
    assert make_rows("p", ["a"], [0.5], "pairs", "bt", 1.0, rng, keep_ties=True) == []


def test_keep_ties_is_deterministic_per_seed_and_changes_nothing_without_ties():
    """The same seed gives the same labels; where no two rewards tie, --keep-ties draws the very
    same random numbers and rows as the default (so default files are unchanged)."""
    tied, untied = [1.0, 1.0, 0.0, 0.5, 1.0], [0.3, 1.0, 0.0, 0.5, 0.9]
    for fmt in ("pairs", "best_of_n", "ranked"):
        for pairing in ("bt", "best-worst"):
            def rows(rewards, seed, keep):
                return make_rows("p", list("abcde"), rewards, fmt, pairing, 1.0,
                                 random.Random(seed), 0, keep_ties=keep)
            assert rows(tied, 3, True) == rows(tied, 3, True)
            for seed in range(20):
                assert rows(untied, seed, True) == rows(untied, seed, False)


def test_has_tie():
    assert has_tie({"chosen_reward": 1.0, "rejected_reward": 1.0})
    assert not has_tie({"chosen_reward": 1.0, "rejected_reward": 0.0})
    assert has_tie({"rewards": [0.0, 1.0, 0.0]}) and not has_tie({"rewards": [0.0, 1.0]})


def test_distinct_responses_drop_empty_and_repeated_texts():
    assert distinct_responses(["a", " ", "a", "b", ""]) == (["a", "b"], [0, -1, 0, 1, -1])


def test_summary_counts_rewards_of_every_sample_and_empty_ones_as_failures():
    """4 samples, one empty: rewards (1, 0.1, 1); mean 0.7, success rate 2 / 4 = 0.5."""
    from softpo.prefs import BuildStats

    s = BuildStats(prompts=1, responses=4, empty=1, rewards=[1.0, 0.1, 1.0]).summary(1.0)
    assert s["reward_mean"] == pytest.approx(0.7) and s["success_rate"] == 0.5
    assert s["reward_counts"] == {"0.1": 1, "1": 2} and "rewards" not in s
    assert "success_rate" not in BuildStats(responses=1, rewards=[1.0]).summary()


def test_write_atomic_replaces_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "sub" / "x.jsonl"
    write_atomic(path, "one\n")
    write_atomic(path, "two\n")
    assert path.read_text() == "two\n" and [p.name for p in path.parent.iterdir()] == ["x.jsonl"]
    assert summary_path(path).name == "x.summary.json"


# ---------------------------------------------------------------- end to end on the tiny model

@pytest.fixture
def neg_len_expert(tmp_path, monkeypatch):
    """A module `neg_len_expert_mod:reward` = -len(response): shorter is better."""
    (tmp_path / "neg_len_expert_mod.py").write_text(
        "def reward(prompt, response):\n    return -len(response)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "neg_len_expert_mod:reward"


def run(tmp_path, name, *extra):
    out = tmp_path / f"{name}.jsonl"
    source = [] if "--prompts" in extra else ["--task", "arithmetic", "--num-prompts", "6"]
    args = ["build-prefs", "--model", "tiny", *source, "-n", "3", "--max-new-tokens", "6",
            "--batch-size", "6", "--out", str(out), "--no-progress", *extra]
    assert main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return out, rows, json.loads(summary_path(out).read_text())


@pytest.mark.parametrize("fmt", ["pairs", "best_of_n", "ranked"])
def test_build_prefs_writes_rows_that_softpo_data_reads(fmt, tmp_path, neg_len_expert):
    out, rows, summary = run(tmp_path, fmt, "--format", fmt, "--pairing", "best-worst",
                             "--expert", neg_len_expert)
    assert summary["rows"] == len(rows) >= 1 and summary["prompts"] == 6
    assert summary["responses"] == 18 == summary["distinct"] + summary["duplicates"] + summary["empty"]
    assert summary["skipped_ties"] + summary["skipped_too_few"] == 6 - len(rows)
    assert summary["reward_mean"] == pytest.approx(
        sum(float(k) * v for k, v in summary["reward_counts"].items()) / (18 - summary["empty"]))
    for row in rows:
        assert isinstance(row["prompt"], list) and row["prompt"][-1]["role"] == "user"
        if fmt == "pairs":  # best vs worst under reward = -len
            assert row["chosen_reward"] == -len(row["chosen"]) > -len(row["rejected"])
            assert row["rejected_reward"] == -len(row["rejected"])
        else:
            assert row["rewards"] == [-len(t) for t in row["responses"]]
            assert len(set(row["responses"])) == len(row["responses"]) >= 2
        if fmt == "best_of_n":
            assert row["rewards"][row["best"]] == max(row["rewards"])
        if fmt == "ranked":
            assert [row["rewards"][i] for i in row["ranking"]] == sorted(row["rewards"], reverse=True)
    examples, report = load_preferences(str(out), DataConfig(train=str(out)))
    assert len(examples) == len(rows) and report.kind == fmt
    for ex, row in zip(examples, rows):  # responses[0] is the preferred one, as an assistant turn
        best = row["chosen"] if fmt == "pairs" else row["responses"][
            row["best"] if fmt == "best_of_n" else row["ranking"][0]]
        assert ex.responses[0] == [{"role": "assistant", "content": best}]


def test_build_prefs_is_reproducible_and_bt_pairs_from_a_prompt_file(tmp_path, neg_len_expert):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Say hi.\nCount to three.\nName a colour.\nWhat is 2 + 2?\n")
    common = ["--prompts", str(prompts), "--chat", "--expert", neg_len_expert,
              "--pairs-per-prompt", "0", "--bt-temperature", "0.5"]
    a, rows, _ = run(tmp_path, "a", *common)
    b, _, _ = run(tmp_path, "b", *common)
    assert a.read_bytes() == b.read_bytes()
    assert {r["prompt"][0]["content"] for r in rows} <= set(prompts.read_text().splitlines())
    assert all(r["prompt"][0]["role"] == "user" for r in rows)  # --chat: sampled as a user turn
    assert all(r["chosen_reward"] != r["rejected_reward"] for r in rows)


def test_all_tied_rewards_are_counted_and_no_rows_is_an_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "const_expert_mod.py").write_text("def reward(prompt, response):\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "x.jsonl"
    code = main(["build-prefs", "--model", "tiny", "--task", "arithmetic", "--num-prompts", "2",
                 "-n", "2", "--max-new-tokens", "4", "--expert", "const_expert_mod:reward",
                 "--out", str(out), "--no-progress"])
    assert code == 2 and "no rows" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("fmt", ["pairs", "best_of_n", "ranked"])
def test_keep_ties_turns_all_tied_prompts_into_rows(fmt, tmp_path, monkeypatch):
    """The same all-tied expert with --keep-ties: every prompt with two distinct responses gives a
    row that holds a tie (counted in `tied`), nothing is skipped as a tie, and softpo reads it."""
    (tmp_path / "const_expert_mod2.py").write_text("def reward(prompt, response):\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for pairing in ("bt", "best-worst"):
        out, rows, summary = run(tmp_path, f"{fmt}-{pairing}", "--format", fmt, "--pairing",
                                 pairing, "--expert", "const_expert_mod2:reward", "--keep-ties")
        assert summary["keep_ties"] is True and summary["skipped_ties"] == 0
        assert summary["rows"] == len(rows) == summary["tied"] == 6 - summary["skipped_too_few"] > 0
        assert all(has_tie(r) for r in rows)
        examples, report = load_preferences(str(out), DataConfig(train=str(out)))
        assert len(examples) == len(rows) and report.kind == fmt


def test_skipped_ties_are_counted_per_prompt():
    from softpo.config import ModelConfig
    from softpo.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(ModelConfig())
    model = load_model(ModelConfig(), tokenizer, seed=0)
    scorer = lambda ps, rs: [0.0 if p == "tie" else float(i) for i, p in enumerate(ps)]  # noqa: E731
    rows, stats = build_preferences(model, tokenizer, ["tie", "a", "b"], scorer, n=3,
                                    max_new_tokens=5, seed=0, progress=False)
    assert stats.skipped_ties == 1 and stats.prompts == 3
    assert {r["prompt"] for r in rows} <= {"a", "b"} and stats.rows == len(rows)


@pytest.mark.parametrize("argv, message", [
    (["-n", "1"], "must be >= 2"),
    (["--bt-temperature", "0"], "--bt-temperature must be > 0"),
    (["--prompts", "p.txt"], "exactly one prompt source"),
    (["--out", "x.json"], "must end in .jsonl"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, tmp_path, capsys):
    base = {"--out": str(tmp_path / "x.jsonl")}
    args = ["build-prefs", "--model", "tiny", "--task", "arithmetic", "--no-progress"]
    args += argv + ([] if "--out" in argv else ["--out", base["--out"]])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


# ---------------------------------------------------------------- a reward model as the expert

def _tiny_reward_model(folder, num_labels=1):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from softpo.models import byte_tokenizer

    tokenizer = byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         num_labels=num_labels, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def test_reward_model_scores_match_an_unbatched_forward(tmp_path):
    """Batched, padded scoring gives each response the logit of its own unpadded sequence
    (rendered as prompt + assistant turn by the reward model's chat template)."""
    model, tokenizer = _tiny_reward_model(tmp_path / "rm")
    out, rows, summary = run(tmp_path, "rm", "--format", "ranked", "--reward-model",
                             str(tmp_path / "rm"))
    assert summary["expert"] == str(tmp_path / "rm") and rows
    for row in rows[:2]:
        for text, score in zip(row["responses"], row["rewards"]):
            chat = tokenizer.apply_chat_template(
                row["prompt"] + [{"role": "assistant", "content": text}], tokenize=False)
            ids = torch.tensor([tokenizer(chat, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                assert score == pytest.approx(float(model(ids).logits[0, 0]), abs=1e-5)


def test_reward_model_with_two_outputs_is_a_user_error(tmp_path, capsys):
    _tiny_reward_model(tmp_path / "rm2", num_labels=2)
    code = main(["build-prefs", "--model", "tiny", "--task", "arithmetic", "--reward-model",
                 str(tmp_path / "rm2"), "--out", str(tmp_path / "x.jsonl"), "--no-progress"])
    assert code == 2 and "has 2 outputs" in capsys.readouterr().err
