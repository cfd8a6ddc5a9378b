"""Exact candidate-set evaluation (softpo/candidates.py): probabilities against an enumerable
world and against sampling, the packed and padded layouts, temperature, hand-worked metrics and
one-line errors for bad candidate rows."""

import json
import math

import pytest
import torch

from softpo import candidates as K
from softpo.collate import collate
from softpo.config import TinyModelConfig
from softpo.errors import UserError
from softpo.lab import seqmodel
from softpo.logprobs import label_logps, response_states
from softpo.packing import Rows
from softpo.models import build_tiny_model, byte_tokenizer
from softpo.sampling import sample
from softpo.tasks import choices
from softpo.tasks.experts import callable_scorer

# Chi-square critical value, 4 degrees of freedom, upper tail 0.001 (tables: 18.467): the test
# below fails by chance once in a thousand seeds; its seed is fixed.
CHI2_4_P001 = 18.467


def peaked_model(space, seed=3, scale=4.0):
    """The sequence lab's tiny Llama over letters + <eos>, its output layer scaled up so that its
    distribution is far from uniform."""
    model = seqmodel.build_model(seqmodel.make_tokenizer(space.letters), seed, 1, 32, 2)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model.eval()


def lab_rows(space):
    """Every response shorter than the length cap (they end with <eos>) as candidates of the
    prompt <eos>; the responses of max_len letters (ended by the cap) are the outside."""
    short = [s for s in space.strings if len(s) < space.max_len]
    return [K.CandidateRow(seqmodel.EOS, short, [float(len(s)) for s in short])], short


def tiny(architecture="llama", seed=0):
    tok = byte_tokenizer()
    cfg = TinyModelConfig(n_layer=1, n_embd=32, n_head=2, architecture=architecture)
    return tok, build_tiny_model(cfg, tok, seed).eval()


def mixed_rows():
    """Chat prompts of the choices task (26 or 121 candidates) and string prompts."""
    rows = K.task_rows("test", 3, seed=0, families=("spelling", "words", "range"))
    return rows + [K.CandidateRow("Q: 2 + 2 =", [" 4", " 5", " four"], [1.0, 0.0, 0.5]),
                   K.CandidateRow("Colour?", [" red", " blue"], [1.0, 1.0])]


# ---------------------------------------------------------------- (a) an enumerable world

def test_lab_world_candidates_equal_the_exact_distribution_and_sum_to_one_with_the_outside():
    """Letters abc, at most 3 letters: the 13 responses of 0..2 letters are candidates (tokens
    y + <eos>, as training renders them); their probabilities are the lab scorer's exact ones, and
    with the 27 responses of 3 letters (the outside) they sum to 1."""
    space = seqmodel.make_space("abc", 3)
    model = peaked_model(space)
    tok = seqmodel.make_tokenizer("abc")
    rows, short = lab_rows(space)
    exact = seqmodel.Scorer(space).exact(model)  # (Y,) float64
    idx = [space.strings.index(s) for s in short]
    outside = [j for j, s in enumerate(space.strings) if len(s) == space.max_len]
    for layout in K.LAYOUTS:
        logps = K.candidate_logps(model, tok, rows, layout=layout)[0]
        torch.testing.assert_close(logps, exact[idx], atol=2e-5, rtol=0)
        total = logps.exp().sum() + exact[outside].exp().sum()
        assert abs(float(total) - 1.0) < 1e-5
        metrics = K.candidate_metrics(logps, rows[0].rewards)
        assert metrics["outside"] == pytest.approx(float(exact[outside].exp().sum()), abs=1e-5)


# ---------------------------------------------------------------- (b) against sampling

def test_probabilities_match_generate_frequencies():
    """5000 pure samples (softpo.sampling.sample, max_new_tokens = 2) fall on the 4 candidates
    (responses of 0 or 1 letters) and the outside (2 letters) with the exact frequencies: Pearson
    chi-square below its p = 0.001 critical value (4 degrees of freedom); the same counts are far
    from the uniform distribution over the 5 outcomes (the test has power)."""
    space = seqmodel.make_space("abc", 2)
    model = peaked_model(space)
    tok = seqmodel.make_tokenizer("abc")
    rows, short = lab_rows(space)
    probs = K.candidate_logps(model, tok, rows)[0].exp()  # (4,)
    expected = torch.cat([probs, 1 - probs.sum(0, keepdim=True)])  # (5,) candidates, outside
    prompt = torch.tensor([[space.eos_id]])
    n = 5000
    batch = sample(model, tok, prompt, torch.ones_like(prompt), n, space.max_len, seed=0)
    counts = torch.zeros(5, dtype=torch.float64)
    for ids, mask in zip(batch.rows.input_ids, batch.rows.response_mask):
        text = space.strings[space.index(ids[mask].tolist())]
        counts[short.index(text) if text in short else 4] += 1
    assert counts.sum() == n and float(expected.min()) * n > 5  # the chi-square approximation
    chi2 = float(((counts - n * expected) ** 2 / (n * expected)).sum())
    assert chi2 < CHI2_4_P001
    uniform = torch.full((5,), n / 5, dtype=torch.float64)
    assert float(((counts - uniform) ** 2 / uniform).sum()) > 10 * CHI2_4_P001


# ---------------------------------------------------------------- (c) layouts and batching

@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_packed_equals_padded_and_batching_changes_nothing(architecture):
    tok, model = tiny(architecture)
    rows = mixed_rows()
    padded = K.candidate_logps(model, tok, rows, layout="padded", max_rows=1000)
    packed = K.candidate_logps(model, tok, rows, layout="packed", max_rows=1000)
    one_by_one = K.candidate_logps(model, tok, rows, layout="padded", max_rows=1)
    for a, b, c, row in zip(padded, packed, one_by_one, rows):
        assert a.shape == (len(row.candidates),) and a.dtype == torch.float64
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-5)


def test_row_batches_by_hand():
    """Sizes 3, 5, 2, 10, 1 under 10 rows: {3, 5} pads to 2 x 5 = 10; adding 2 would be 3 x 5;
    10 fills a forward alone; 1 after 10 would pad to 2 x 10."""
    assert K.row_batches([3, 5, 2, 10, 1], 10) == [[0, 1], [2], [3], [4]]
    assert K.row_batches([3, 3, 3], 9) == [[0, 1, 2]]
    assert K.row_batches([12], 10) == [[0]]


def test_candidate_tokens_are_training_tokens_ending_at_the_end_of_turn():
    """Chat: a candidate is its text and <|im_end|> (the template's newline after it is not part
    of a sampled response); with stop_at_eos=False it is exactly training's tokens."""
    tok, model = tiny()
    row = K.task_rows("test", 1, 0, ("spelling",))[0]
    stopped = K.tokenize_candidates(row, tok, K.eos_ids(model, tok))
    full = K.tokenize_candidates(row, tok)
    assert tok.decode(stopped.response_ids[0]) == row.candidates[0] + "<|im_end|>"
    assert tok.decode(full.response_ids[0]) == row.candidates[0] + "<|im_end|>\n"
    with_newline = K.candidate_logps(model, tok, [row], stop_at_eos=False)[0]
    without = K.candidate_logps(model, tok, [row])[0]
    assert bool((with_newline < without).all())


# ---------------------------------------------------------------- (d) metrics by hand

def test_metrics_by_hand():
    """p = (0.3, 0.15, 0.05, 0.1), r = (1, 1, 1, 0): C = the first three.
    success = 0.5; outside = 1 - 0.6 = 0.4; q = (0.6, 0.3, 0.1);
    H(q) = -(0.6 ln 0.6 + 0.3 ln 0.3 + 0.1 ln 0.1) = 0.897946; entropy = H / ln 3 = 0.817343;
    KL(q || uniform) = ln 3 - H = 0.200666; coverage: 0.6 and 0.3 >= 0.5/3, 0.1 is not -> 2/3;
    top share 0.6; reward = 0.5.
    Restricted model m = p / 0.6 = (1/2, 1/4, 1/12, 1/6); expert at alpha = 0.5:
    e = (e^2, e^2, e^2, 1) / (3 e^2 + 1); KL(m || e) = sum m ln(m / e) = 0.277220."""
    p = torch.tensor([0.3, 0.15, 0.05, 0.1], dtype=torch.float64)
    m = K.candidate_metrics(p.log(), [1, 1, 1, 0], alpha=0.5)
    H = -(0.6 * math.log(0.6) + 0.3 * math.log(0.3) + 0.1 * math.log(0.1))
    z = 3 * math.e ** 2 + 1
    kl = sum(mi * math.log(mi / ei) for mi, ei in zip(
        (1 / 2, 1 / 4, 1 / 12, 1 / 6), (math.e ** 2 / z, math.e ** 2 / z, math.e ** 2 / z, 1 / z)))
    assert H == pytest.approx(0.897946, abs=1e-6) and kl == pytest.approx(0.277220, abs=1e-6)
    want = {"success": 0.5, "outside": 0.4, "reward": 0.5, "num_correct": 3, "num_candidates": 4,
            "entropy": H / math.log(3), "kl_uniform": math.log(3) - H, "coverage": 2 / 3,
            "top_share": 0.6, "kl_expert": kl}
    assert m.keys() == want.keys()
    for key, value in want.items():
        assert m[key] == pytest.approx(value, abs=1e-12), key


def test_metrics_edge_cases():
    """One correct candidate: entropy 1, KL to uniform 0, coverage 1. A uniform model on C and
    rewards (1, 1, 0) at tiny alpha: KL to the expert ~0. A threshold below the best reward
    widens C."""
    one = K.candidate_metrics(torch.tensor([0.2, 0.3]).log(), [1.0, 0.0])
    assert (one["entropy"], one["kl_uniform"], one["coverage"], one["top_share"]) == \
        (1.0, 0.0, 1.0, 1.0)
    assert one["success"] == pytest.approx(0.2)
    flat = K.candidate_metrics(torch.tensor([0.25, 0.25, 1e-30]).double().log(), [1, 1, 0],
                               alpha=1e-3)
    assert flat["kl_expert"] == pytest.approx(0.0, abs=1e-12) and flat["coverage"] == 1.0
    assert flat["entropy"] == pytest.approx(1.0) and flat["outside"] == pytest.approx(0.5)
    wide = K.candidate_metrics(torch.tensor([0.2, 0.3, 0.1]).log(), [1.0, 0.5, 0.0],
                               threshold=0.5)
    assert wide["num_correct"] == 2 and wide["success"] == pytest.approx(0.5)


def test_evaluate_reports_each_candidate_and_the_means():
    tok, model = tiny()
    rows = K.task_rows("test", 4, seed=0)
    report = K.evaluate_candidates(model, tok, rows, alpha=0.5, layout="packed")
    assert len(report.results) == 4 and report.summary["prompts"] == 4
    for row, res in zip(rows, report.results):
        assert [c.text for c in res.candidates] == row.candidates
        assert [c.reward for c in res.candidates] == row.rewards
        assert all(c.prob == pytest.approx(math.exp(c.logp)) for c in res.candidates)
        success = sum(c.prob for c in res.candidates if c.reward == 1.0)
        assert res.metrics["success"] == pytest.approx(success, rel=1e-9)
    mean = sum(r.metrics["kl_expert"] for r in report.results) / 4
    assert report.summary["kl_expert"] == pytest.approx(mean)


# ---------------------------------------------------------------- (e) candidate rows

def write(tmp_path, rows, name="cands.jsonl"):
    """A JSONL file of `rows` (a string row is written as it is)."""
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


GOOD = {"prompt": "Name a vowel.", "candidates": ["A", "B"], "rewards": [1, 0]}


@pytest.mark.parametrize("bad, field, message", [
    ({"candidates": ["A"], "rewards": [1]}, "prompt", "missing"),
    ({"prompt": "", "candidates": ["A"], "rewards": [1]}, "prompt", "is empty"),
    ({"prompt": "q", "rewards": [1]}, "candidates", "missing"),
    ({"prompt": "q", "candidates": [], "rewards": []}, "candidates", "has no candidates"),
    ({"prompt": "q", "candidates": "A", "rewards": [1]}, "candidates", "must be a list"),
    ({"prompt": "q", "candidates": ["A", 3], "rewards": [1, 0]}, "candidates[1]",
     "must be a string"),
    ({"prompt": "q", "candidates": ["A", "B", "A"], "rewards": [1, 0, 1]}, "candidates[2]",
     "'A' repeats candidates[0]"),
    ({"prompt": "q", "candidates": ["A", "B"], "rewards": [1]}, "rewards",
     "has 1 rewards for 2 candidates"),
    ('{"prompt": "q", "candidates": ["A", "B"], "rewards": [1, NaN]}', "rewards[1]",
     "must be a finite number, got nan"),
    ({"prompt": "q", "candidates": ["A", "B"], "rewards": [1, "x"]}, "rewards[1]",
     "must be a finite number"),
    ({"prompt": "q", "candidates": ["A", "B"]}, "rewards", "missing (give rewards, or an expert"),
])
def test_bad_rows_are_one_line_errors_naming_file_row_field(tmp_path, bad, field, message):
    path = write(tmp_path, [GOOD, GOOD, bad])
    with pytest.raises(UserError) as err:
        K.read_candidates(path)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"{path}:3: field '{field}': ")
    assert message in text
    assert (err.value.source, err.value.row, err.value.field) == (path, 3, field)


def test_reader_accepts_conversations_csv_lists_and_an_expert(tmp_path):
    chat = [{"role": "user", "content": "Name a vowel."}]
    rows = K.read_candidates(write(tmp_path, [GOOD, {"prompt": chat, "candidates": ["E", "Z"],
                                                     "rewards": [1.0, 0.0]}]))
    assert [r.row for r in rows] == [1, 2] and rows[1].prompt == chat
    assert rows[0].rewards == [1.0, 0.0] and rows[0].candidates == ["A", "B"]
    csv = tmp_path / "c.csv"
    csv.write_text('prompt,candidates,rewards\nName a vowel.,"[""A"", ""B""]","[1, 0]"\n')
    assert K.read_candidates(str(csv))[0].candidates == ["A", "B"]
    scorer = callable_scorer(choices.reward, "softpo.tasks.choices:reward")
    scored = K.read_candidates(write(tmp_path, [{"prompt": "Name a vowel.",
                                                 "candidates": ["A", "B", "e"]}]), scorer)
    assert scored[0].rewards == [1.0, 0.0, 1.0]


def test_task_rows_carry_the_task_reward():
    rows = K.task_rows("test", 6, seed=2)
    for row in rows:
        assert row.candidates == choices.candidates(row.prompt)
        assert row.rewards == [choices.reward(row.prompt, c) for c in row.candidates]
        assert sum(row.rewards) == len(choices.correct(row.prompt))


def test_bad_options():
    tok, model = tiny()
    rows = [K.CandidateRow("q", ["a"], [1.0])]
    with pytest.raises(UserError, match="unknown layout 'dense'"):
        K.candidate_logps(model, tok, rows, layout="dense")
    with pytest.raises(UserError, match="temperature must be a positive number"):
        K.candidate_logps(model, tok, rows, temperature=0.0)
    with pytest.raises(UserError, match="alpha must be > 0"):
        K.evaluate_candidates(model, tok, rows, alpha=0)


# ---------------------------------------------------------------- (f) temperature

def direct_logps(model, tok, row, temperature):
    """log prod_t softmax(logits_t / T)[y_t] from one plain forward per candidate (the oracle)."""
    ex = K.tokenize_candidates(row, tok, K.eos_ids(model, tok))
    out = []
    for response in ex.response_ids:
        ids = torch.tensor([ex.prompt_ids + response])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double() / temperature  # (L, V)
        logps = torch.log_softmax(logits, -1)
        P = len(ex.prompt_ids)
        out.append(sum(float(logps[P + k - 1, t]) for k, t in enumerate(response)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_temperature_against_full_logits(temperature):
    tok, model = tiny(seed=1)
    number, *strings = mixed_rows()[2:]  # a chat prompt with 121 candidates, two string prompts
    rows = [K.CandidateRow(number.prompt, number.candidates[:9], number.rewards[:9])] + strings
    for layout in K.LAYOUTS:
        got = K.candidate_logps(model, tok, rows, temperature=temperature, layout=layout)
        for row, logps in zip(rows, got):
            torch.testing.assert_close(logps, direct_logps(model, tok, row, temperature),
                                       atol=1e-4, rtol=1e-5)


def test_tempered_path_at_t_1_equals_training_scorer_and_full_logits_fallback():
    tok, model = tiny()
    examples = [K.tokenize_candidates(r, tok) for r in mixed_rows()[3:]]
    batch = collate(examples, tok.pad_token_id)
    rows = Rows(batch.input_ids, batch.attention_mask, batch.response_mask)
    states = response_states(model, rows.input_ids, rows.attention_mask, rows.response_mask)
    head = model.get_output_embeddings()
    with torch.no_grad():
        torch.testing.assert_close(K._tempered_label_logps(states, head, 1.0, 7),
                                   label_logps(states, head))
        torch.testing.assert_close(K._full_logits_tempered(model, rows, 0.6),
                                   K.tempered_token_logps(model, rows, 0.6), atol=1e-5, rtol=0)


def test_a_row_longer_than_the_model_context_is_an_error():
    space = seqmodel.make_space("abc", 2)
    model, tok = peaked_model(space), seqmodel.make_tokenizer("abc")  # 32 positions
    rows = [K.CandidateRow(seqmodel.EOS, ["ab", "c" * 40], [1.0, 0.0], "long.jsonl", 7)]
    with pytest.raises(UserError, match=r"^long.jsonl:7: field 'candidates': prompt \+ "
                                        r"candidate is 42 tokens, more than the model's 32$"):
        K.candidate_logps(model, tok, rows)


# ---------------------------------------------------------------- (f) the command line

def cli_rows(tmp_path, task="choices-words", n=3):
    """`softpo tasks candidates` rows in a file, and the same rows as the library reads them."""
    from softpo import cli

    path = tmp_path / "cands.jsonl"
    assert cli.main(["tasks", "candidates", "--task", task, "-n", str(n), "--out", str(path)]) == 0
    return str(path), K.read_candidates(str(path))


def tiny_by_name():
    """The model `softpo eval tiny` loads: softpo's tiny default model with seed 0, on the device
    the command uses."""
    from softpo.config import ModelConfig
    from softpo.hardware import default_device
    from softpo.models import load_model, load_tokenizer

    tok = load_tokenizer(ModelConfig(name_or_path="tiny"))
    return tok, load_model(ModelConfig(name_or_path="tiny"), tok, seed=0).eval().to(default_device())


@pytest.mark.parametrize("options, kwargs", [
    ([], {}),
    (["--temperature", "2", "--alpha", "0.5", "--threshold", "0.5", "--layout", "packed"],
     dict(temperature=2.0, alpha=0.5, threshold=0.5, layout="packed")),
])
def test_the_eval_candidates_command_reports_what_the_library_computes(tmp_path, capsys, options,
                                                                       kwargs):
    """`softpo eval tiny --candidates FILE --json`: the library's summary, and for every prompt
    each candidate's text, prob and reward in the row's order; without --json, a table of the
    means over prompts with the same numbers (4 decimals)."""
    from softpo import cli

    path, rows = cli_rows(tmp_path)
    capsys.readouterr()
    tok, model = tiny_by_name()
    want = K.evaluate_candidates(model, tok, rows, **kwargs)
    assert cli.main(["eval", "tiny", "--candidates", path, "--json", *options]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["summary"] == pytest.approx(want.summary, rel=1e-9)
    assert len(got["prompts"]) == len(rows) == 3
    for res, row, ref in zip(got["prompts"], rows, want.results):
        assert res["prompt"] == row.prompt
        assert [c["text"] for c in res["candidates"]] == row.candidates
        assert [c["reward"] for c in res["candidates"]] == row.rewards
        assert [c["prob"] for c in res["candidates"]] == pytest.approx(
            [c.prob for c in ref.candidates], rel=1e-9)
    assert cli.main(["eval", "tiny", "--candidates", path, *options]) == 0
    lines = capsys.readouterr().out.splitlines()
    header, values = lines[-2].split(), lines[-1].split()
    assert header == ["prompts", "success", "outside", "entropy", "kl_uniform", "coverage",
                      "top_share", "kl_expert", "reward"]
    assert values[0] == "3"
    for name, value in zip(header[1:], values[1:]):
        assert float(value) == pytest.approx(want.summary[name], abs=5e-5)


def test_the_eval_candidates_command_scores_rows_without_rewards_with_the_expert(tmp_path, capsys):
    """Rows without `rewards` get the expert's (here the task's own reward): the same report."""
    from softpo import cli

    path, rows = cli_rows(tmp_path, n=2)
    bare = write(tmp_path, [{"prompt": r.prompt, "candidates": r.candidates} for r in rows],
                 "bare.jsonl")
    capsys.readouterr()
    assert cli.main(["eval", "tiny", "--candidates", path, "--json"]) == 0
    with_rewards = json.loads(capsys.readouterr().out)
    assert cli.main(["eval", "tiny", "--candidates", bare, "--json", "--expert",
                     "softpo.tasks.choices:reward"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["prompts"] == with_rewards["prompts"]
    assert scored["summary"] == with_rewards["summary"]


@pytest.mark.parametrize("extra, message", [
    (["--candidates", "{bad}"], "{bad}:1: field 'rewards': missing (give rewards, or an expert"),
    (["--candidates", "{good}", "--data", "{good}"],
     "give exactly one of --data FILE, --candidates FILE or --prompts FILE (got --data and "
     "--candidates)"),
    ([], "give exactly one of --data FILE, --candidates FILE or --prompts FILE"),
    (["--candidates", "{good}", "--alpha", "0"], "--alpha must be > 0, got 0.0"),
    (["--candidates", "{good}", "--temperature", "-1"], "--temperature must be > 0, got -1.0"),
    (["--candidates", "{good}", "--threshold", "nan"], "--threshold must be a finite number"),
    (["--candidates", "{good}", "--ref", "tiny"], "--ref is not used with --candidates"),
    (["tiny", "--candidates", "{good}"], "--candidates evaluates one model"),
    (["--candidates", "{missing}"], "{missing}"),
])
def test_the_eval_candidates_command_rejects_bad_input_in_one_line(tmp_path, capsys, extra,
                                                                    message):
    from softpo import cli

    files = {"bad": write(tmp_path, [{"prompt": "q", "candidates": ["A", "B"]}], "bad.jsonl"),
             "good": write(tmp_path, [GOOD], "good.jsonl"),
             "missing": str(tmp_path / "missing.jsonl")}
    args = [a.format(**files) for a in extra]
    assert cli.main(["eval", "tiny", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(**files) in err


def test_the_eval_command_names_the_layouts_of_the_library():
    """`softpo eval --layout` lists softpo.candidates.LAYOUTS (spelled out so that the command's
    --help does not import torch)."""
    import argparse

    from softpo import commands

    parser = argparse.ArgumentParser()
    commands.eval_arguments(parser)
    layout = next(a for a in parser._actions if a.dest == "layout")
    assert tuple(layout.choices) == K.LAYOUTS
