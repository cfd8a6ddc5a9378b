"""The choices task family (softpo/tasks/choices.py): questions with many right answers, their
candidate sets, the expert reward and the splits."""

import pytest

from softpo.collate import tokenize_example
from softpo.config import DataConfig
from softpo.data import PreferenceExample
from softpo.errors import UserError
from softpo.models import byte_tokenizer
from softpo.tasks import TASKS, get_task
from softpo.tasks import choices as C


def ask(text):
    """A prompt asking `text`, after a worked example of another question."""
    return [{"role": "system", "content": C.SYSTEM},
            {"role": "user", "content": "Name a prime number between 1 and 9."},
            {"role": "assistant", "content": "5"}, {"role": "user", "content": text}]


# ---------------------------------------------------------------- correct sets by hand

@pytest.mark.parametrize("text, right", [
    ("Name a prime number between 10 and 50.",
     {"11", "13", "17", "19", "23", "29", "31", "37", "41", "43", "47"}),
    ("Name a multiple of 7 between 20 and 50.", {"21", "28", "35", "42", "49"}),
    ("Name an even number between 1 and 9.", {"2", "4", "6", "8"}),
    ("Name an odd number between 10 and 16.", {"11", "13", "15"}),
    ("Name a number greater than 3 and less than 7.", {"4", "5", "6"}),
    ('Name a letter in the word "PEPPER".', {"P", "E", "R"}),
    ('Name a letter in the word "GARDEN".', {"G", "A", "R", "D", "E", "N"}),
    ("Name a month with 31 days.", {"January", "March", "May", "July", "August", "October",
                                    "December"}),
    ("Name a month with 30 days.", {"April", "June", "September", "November"}),
    ("Name a day of the weekend.", {"Saturday", "Sunday"}),
    ("Name a planet larger than Earth.", {"Jupiter", "Saturn", "Uranus", "Neptune"}),
    ("Name a vowel.", {"A", "E", "I", "O", "U"}),
    ("Name a colour of the rainbow.", {"Red", "Orange", "Yellow", "Green", "Blue", "Indigo",
                                       "Violet"}),
])
def test_correct_sets_by_hand(text, right):
    assert C.correct(ask(text)) == right
    assert C.correct(text) == right  # a string prompt is the question itself


@pytest.mark.parametrize("text, cands", [
    ("Name a prime number between 10 and 50.", [str(n) for n in range(121)]),
    ("Name an even number between 1 and 9.", [str(n) for n in range(121)]),
    ('Name a letter in the word "GARDEN".', list("ABCDEFGHIJKLMNOPQRSTUVWXYZ")),
    ("Name a month with 31 days.", list(C.MONTHS)),
    ("Name a vowel.", list("ABCDEFGHIJKLMNOPQRSTUVWXYZ")),
])
def test_candidates_by_hand(text, cands):
    assert C.candidates(ask(text)) == cands


def test_every_question_has_distinct_candidates_holding_several_correct_ones():
    """In both splits of every family: candidates duplicate-free, at least two correct answers,
    all among the candidates; the prompt's text gives the question back."""
    for family in C.FAMILIES:
        for split in C.SPLITS:
            qs = C.questions(family, split)
            assert qs, (family, split)
            for q in qs:
                assert len(set(q.candidates)) == len(q.candidates), q.text
                assert q.correct <= set(q.candidates), q.text
                assert len(q.correct) >= 2, q.text
                assert C.question_for(C.conversation(q)) == q


def test_between_never_has_a_right_answer_at_an_endpoint():
    """"Between a and b" is ambiguous about a and b: no question depends on it."""
    for family in ("primes", "multiples", "parity"):
        for q in C.questions(family, "train") + C.questions(family, "test"):
            *rest, a, b = q.params
            inclusive = C.build(family, (*rest, a - 1, b + 1))  # a and b would count as well
            assert inclusive.correct == q.correct, q.text


def test_primes_by_sieve():
    assert [n for n in range(50) if C.is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37,
                                                       41, 43, 47]


# ---------------------------------------------------------------- reward by hand

@pytest.mark.parametrize("text, response, expected", [
    # bare correct (whitespace, one trailing period, case for words) -> 1
    ("Name a prime number between 10 and 50.", "17", 1.0),
    ("Name a prime number between 10 and 50.", " 47.\n", 1.0),
    ("Name a month with 31 days.", "July", 1.0),
    ("Name a month with 31 days.", "july.", 1.0),
    ('Name a letter in the word "GARDEN".', "r", 1.0),
    ("Name a number greater than 3 and less than 7.", "05", 1.0),
    # bare wrong, or not a candidate -> 0
    ("Name a prime number between 10 and 50.", "15", 0.0),
    ("Name a prime number between 10 and 50.", "53", 0.0),  # prime, but out of range
    ("Name a number greater than 3 and less than 7.", "3", 0.0),
    ('Name a letter in the word "GARDEN".', "GARDEN", 0.0),
    ("Name a month with 31 days.", "June", 0.0),
    ("Name a month with 31 days.", "Julember", 0.0),
    ("Name a vowel.", "B", 0.0),
    ("Name a prime number between 10 and 50.", "", 0.0),
    # correct but wordy: 0.5 - 0.25 * min(1, extra / 48), extra = len(stripped) - len(answer)
    ("Name a prime number between 10 and 50.", "17 is prime", 0.5 - 0.25 * 9 / 48),
    ("Name a prime number between 10 and 50.", "17..", 0.5 - 0.25 * 2 / 48),
    ("Name a month with 31 days.", "The month of July.", 0.5 - 0.25 * 14 / 48),
    ("Name a vowel.", "The letter E", 0.5 - 0.25 * 11 / 48),  # 'The', 'letter' are no letters
    ("Name a prime number between 10 and 50.", "17" + " because" * 10, 0.25),  # the floor
    # wordy with a wrong first candidate -> 0
    ("Name a prime number between 10 and 50.", "15 or 17", 0.0),
    ("Name a month with 31 days.", "June, or July", 0.0),
    ('Name a letter in the word "GARDEN".', "I pick G", 0.0),  # 'I' is the first letter
])
def test_reward_hand_cases(text, response, expected):
    assert C.reward(ask(text), response) == pytest.approx(expected, abs=1e-12)


def test_reward_reads_the_last_question_not_the_worked_example():
    """The worked example asks for a prime between 1 and 9 (5 is right); the question does not."""
    prompt = ask("Name an even number between 1 and 9.")
    assert C.reward(prompt, "4") == 1.0 and C.reward(prompt, "5") == 0.0


def test_reward_rejects_a_prompt_without_a_question():
    with pytest.raises(UserError, match="not a choices task prompt"):
        C.reward([{"role": "user", "content": "Tell me a joke."}], "no")


def test_under_the_reward_exactly_the_correct_candidates_score_1():
    """So the expert distribution on the candidates, softmax(r / alpha), is uniform on them."""
    for row in C.candidate_rows("test", 40, seed=1):
        right = C.correct(row["prompt"])
        assert row["candidates"] == C.candidates(row["prompt"])
        assert row["rewards"] == [1.0 if c in right else 0.0 for c in row["candidates"]]


# ---------------------------------------------------------------- prompts and splits

def test_splits_are_disjoint_in_questions_and_parameters():
    shown = {text for f in C.FAMILIES.values() for text, _ in f.examples} | \
        {text for _, examples in C.WORD_GROUPS.values() for text, _ in examples}
    for family in C.FAMILIES:
        train = {q.params for q in C.questions(family, "train")}
        test = {q.params for q in C.questions(family, "test")}
        assert train and test and not train & test, family
        asked = {q.text for q in C.questions(family, "train") + C.questions(family, "test")}
        assert not shown & asked, family  # worked examples are never asked


def test_held_out_prompts_come_from_the_test_split():
    asked = {p[-1]["content"] for p in C.make_prompts("test", 200, seed=0)}
    train = {q.text for f in C.FAMILIES for q in C.questions(f, "train")}
    assert asked and not asked & train


def test_prompts_are_deterministic_for_a_seed_and_differ_across_seeds():
    assert C.make_prompts("train", 30, seed=5) == C.make_prompts("train", 30, seed=5)
    assert C.make_prompts("train", 30, seed=5) != C.make_prompts("train", 30, seed=6)


def test_prompts_cycle_families_with_two_worked_examples_of_the_same_family():
    questions = C.make_questions("test", 2 * len(C.FAMILIES), seed=0)
    assert [q.family for q in questions] == list(C.FAMILIES) * 2
    for q in questions:
        prompt = C.conversation(q)
        assert [m["role"] for m in prompt] == ["system", "user", "assistant", "user", "assistant",
                                               "user"]
        assert prompt[-1]["content"] == q.text
        examples = [(prompt[1]["content"], prompt[2]["content"]),
                    (prompt[3]["content"], prompt[4]["content"])]
        assert examples == list(C.worked_examples(q))
        for text, answer in examples:  # same candidates as the question; the answer is right
            if q.family == "words":
                assert answer in q.candidates
                continue
            shown = C.question_for(text)
            assert shown.family == q.family and answer in shown.correct


def test_words_examples_answer_from_the_same_set():
    assert C.question_for("Name a planet larger than Earth.").candidates == C.PLANETS
    for candidates, examples in C.WORD_GROUPS.values():
        assert len(examples) == C.SHOTS and all(a in candidates for _, a in examples)


def test_family_option_and_unknown_names():
    assert {q.family for q in C.make_questions("train", 6, 0, ("primes", "spelling"))} == \
        {"primes", "spelling"}
    with pytest.raises(UserError, match="unknown question family 'nope'"):
        C.make_prompts("train", 2, 0, ("nope",))
    with pytest.raises(UserError, match="unknown split"):
        C.make_prompts("dev", 2, 0)


def test_registered_tasks():
    for name in ("choices", "choices-numbers", "choices-words"):
        task = get_task(name)
        assert task.reward_spec == "softpo.tasks.choices:reward" and task.success_threshold == 1.0
        prompts = task.make_prompts("test", 4, 0)
        assert len(prompts) == 4 and all(task.reward(p, "?") == 0.0 for p in prompts)
    words = TASKS["choices-words"][1]["families"]
    assert {q.family for q in C.make_questions("train", 12, 0, words)} == {"spelling", "words"}


def test_prompts_render_with_the_byte_tokenizer_chat_template():
    """Each prompt is a ChatML conversation ending with the assistant's turn; a candidate renders
    as its text and the end of turn."""
    tok = byte_tokenizer()
    cfg = DataConfig(max_length=4096, max_prompt_length=4000)
    for prompt in C.make_prompts("test", 5, seed=0):
        cands = C.candidates(prompt)
        ex = PreferenceExample(prompt, [[{"role": "assistant", "content": c}] for c in cands[:2]],
                               kind="ranked")
        tokens = tokenize_example(ex, tok, cfg)
        assert tokens.prompt_text.endswith(prompt[-1]["content"] + "<|im_end|>\n"
                                           "<|im_start|>assistant\n")
        assert tok.decode(tokens.response_ids[0]) == cands[0] + "<|im_end|>\n"


# ---------------------------------------------------------------- softpo tasks candidates

@pytest.mark.parametrize("task, families", [("choices", None),
                                            ("choices-words", ("spelling", "words"))])
def test_the_tasks_candidates_command_writes_the_candidate_rows(tmp_path, capsys, task, families):
    """The file holds `candidate_rows(split, n, seed, families)` exactly, one JSON row a line,
    and softpo.candidates reads it back."""
    import json

    from softpo.candidates import read_candidates
    from softpo.cli import main

    out = tmp_path / "c.jsonl"
    assert main(["tasks", "candidates", "--task", task, "--split", "train", "-n", "7", "--seed",
                 "3", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == C.candidate_rows("train", 7, 3, families)
    assert len(read_candidates(str(out))) == 7
    assert f"wrote 7 {task}:train prompts" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--task", "arithmetic"], "task 'arithmetic' has no candidate sets (these have: choices, "
                               "choices-numbers, choices-words)"),
    (["--task", "nope"], "unknown task 'nope'"),
    (["-n", "0"], "-n/--num-prompts must be >= 1, got 0"),
    (["--split", "dev"], "unknown split 'dev'"),
    (["--out", "x.json"], "--out must end in .jsonl"),
])
def test_the_tasks_candidates_command_rejects_bad_arguments_in_one_line(tmp_path, capsys, argv,
                                                                        message):
    from softpo.cli import main

    out = [] if "--out" in argv else ["--out", str(tmp_path / "c.jsonl")]
    assert main(["tasks", "candidates", *argv, *out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "c.jsonl").exists()
