"""The shipped task family (arithmetic), its reward, the task registry and expert loading."""

import pytest

from softpo.cli import main
from softpo.errors import UserError
from softpo.tasks import TASKS, get_task
from softpo.tasks import arithmetic as A
from softpo.tasks.experts import callable_scorer, load_callable


def chat(question):
    return [{"role": "system", "content": A.SYSTEM}, {"role": "user", "content": "What is 3 + 4?"},
            {"role": "assistant", "content": "7"}, {"role": "user", "content": question}]


# ---------------------------------------------------------------- reward: hand-worked cases

@pytest.mark.parametrize("question, response, expected", [
    # exact answer (whitespace and one trailing period allowed) -> 1
    ("What is 9 + 8?", "17", 1.0),
    ("What is 9 + 8?", " 17.\n", 1.0),
    ("What is 17 - 3?", "14", 1.0),
    ("Which is larger, 31 or 58?", "58", 1.0),
    ("Which is smaller, 31 or 58?", "31", 1.0),
    # a bare integer, wrong -> 0.1 (the operand of a comparison is still wrong)
    ("What is 9 + 8?", "18", 0.1),
    ("Which is larger, 31 or 58?", "31", 0.1),
    ("What is 9 + 8?", "17..", 0.5 - 0.25 * 2 / 48),  # not bare: extra = 4 - 2 = 2 characters
    # correct but wordy: 0.5 - 0.25 * min(1, extra / 48), extra = len(stripped) - len("17")
    ("What is 9 + 8?", "17 is the sum", 0.5 - 0.25 * 11 / 48),
    ("What is 9 + 8?", "The answer is 17.", 0.5 - 0.25 * 15 / 48),  # first integer is 17
    ("What is 9 + 8?", "9 + 8 = 17", 0.5 - 0.25 * 8 / 48),  # states "= 17"
    ("Which is larger, 31 or 58?", "58 is larger than 31", 0.5 - 0.25 * 18 / 48),
    ("What is 9 + 8?", "17" + " because" * 10, 0.25),  # extra 80 >= 48: the floor
    # wrong -> 0
    ("Which is larger, 31 or 58?", "31 is larger than 58", 0.0),  # first integer 31, no "= 58"
    ("What is 9 + 8?", "9 + 8 = 170", 0.0),  # "= 17" must not be a prefix of a longer number
    ("What is 9 + 8?", "seventeen", 0.0),
    ("What is 9 + 8?", "", 0.0),
])
def test_reward_hand_cases(question, response, expected):
    assert A.reward(chat(question), response) == pytest.approx(expected, abs=1e-12)
    assert A.reward(question, response) == pytest.approx(expected, abs=1e-12)  # string prompt


def test_reward_reads_the_last_question_not_the_worked_example():
    """The example asks 3 + 4 (= 7); the question asks 10 + 10 (= 20)."""
    assert A.reward(chat("What is 10 + 10?"), "20") == 1.0
    assert A.reward(chat("What is 10 + 10?"), "7") == 0.1


def test_reward_rejects_a_prompt_without_a_question():
    with pytest.raises(UserError, match="not an arithmetic task prompt"):
        A.reward([{"role": "user", "content": "Tell me a joke."}], "no")


def test_every_generated_prompt_is_scored_1_for_its_answer_and_not_for_answer_plus_1():
    for q in A.make_questions("train", 40, seed=3) + A.make_questions("test", 40, seed=3):
        prompt = A.conversation(q["kind"], q["question"])
        assert A.reward(prompt, str(q["answer"])) == 1.0
        assert A.reward(prompt, str(q["answer"] + 1)) == 0.1


# ---------------------------------------------------------------- prompts and splits

def _asked(prompts):
    return [p[-1]["content"] for p in prompts]


def test_prompts_are_deterministic_for_a_seed_and_differ_across_seeds():
    assert A.make_prompts("train", 32, seed=5) == A.make_prompts("train", 32, seed=5)
    assert _asked(A.make_prompts("train", 32, seed=5)) != _asked(A.make_prompts("train", 32, seed=6))


def test_prompts_are_conversations_with_worked_examples_of_the_same_kind():
    prompts = A.make_prompts("test", 8, seed=0)
    kinds = [q["kind"] for q in A.make_questions("test", 8, seed=0)]
    assert kinds == list(A.KINDS) * 2  # kinds in turn
    for p, kind in zip(prompts, kinds):
        assert [m["role"] for m in p] == ["system"] + ["user", "assistant"] * A.SHOTS + ["user"]
        assert A.KINDS[kind].pattern.fullmatch(p[1]["content"])
        assert A.KINDS[kind].pattern.fullmatch(p[-1]["content"])


def test_train_and_test_questions_are_disjoint_and_cover_the_space_but_the_examples():
    for kind, spec in A.KINDS.items():
        train, test = set(A.questions(kind, "train")), set(A.questions(kind, "test"))
        assert train and test and not train & test
        shown = set(spec.examples) | {(b, a) for a, b in spec.examples}
        assert train | test == set(spec.operands()) - shown
        if spec.symmetric:  # a + b and b + a are on the same side
            assert all((b, a) not in test for a, b in train)
        assert 0.15 < len(test) / (len(train) + len(test)) < 0.35  # about 1 in TEST_SHARE = 4


def test_sampled_prompt_sets_never_share_a_question_whatever_the_seeds():
    train = {q for s in range(3) for q in _asked(A.make_prompts("train", 200, seed=s))}
    test = {q for s in range(3) for q in _asked(A.make_prompts("test", 200, seed=s))}
    assert train and test and not train & test


def test_a_small_kind_is_cycled_when_more_prompts_are_asked_than_it_has():
    qs = A.make_questions("test", 4 * 60, seed=0)
    subs = [(q["a"], q["b"]) for q in qs if q["kind"] == "sub"]
    assert len(subs) == 60 > len(A.questions("sub", "test"))
    assert set(subs) == set(A.questions("sub", "test"))


def test_unknown_split_and_negative_count_are_user_errors():
    with pytest.raises(UserError, match="unknown split 'dev'"):
        A.make_prompts("dev", 4)
    with pytest.raises(UserError, match=">= 0"):
        A.make_prompts("train", -1)


# ---------------------------------------------------------------- registry and expert specs

def test_registry_loads_the_task_and_its_reward_by_spec():
    task = get_task("arithmetic")
    assert set(TASKS) >= {"arithmetic", "arithmetic-compare", "arithmetic-sums"}
    assert task.reward_spec == "softpo.tasks.arithmetic:reward"
    assert load_callable(task.reward_spec) is A.reward
    assert task.success_threshold == 1.0
    with pytest.raises(UserError, match="unknown task 'algebra'"):
        get_task("algebra")


@pytest.mark.parametrize("spec, message", [
    ("softpo.tasks.arithmetic", "must look like package.module:function"),
    ("softpo.tasks.arithmetic:reward:x", "must look like package.module:function"),
    ("1bad:reward", "must look like package.module:function"),
    ("softpo.tasks.arithmetic:", "must look like package.module:function"),
    ("softpo_no_such_module_xyz:reward", "cannot import 'softpo_no_such_module_xyz'"),
    ("softpo.tasks.arithmetic:no_such_fn", "has no attribute 'no_such_fn'"),
    ("softpo.tasks.arithmetic:SYSTEM", "is a str, not a callable"),
    ("broken_expert_mod:reward", "importing 'broken_expert_mod' failed: ZeroDivisionError"),
])
def test_bad_expert_specs_exit_2_with_one_line(spec, message, tmp_path, monkeypatch, capsys):
    (tmp_path / "broken_expert_mod.py").write_text("x = 1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "prefs.jsonl"
    code = main(["build-prefs", "--model", "tiny", "--task", "arithmetic", "--num-prompts", "2",
                 "--expert", spec, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("softpo: error: expert") and message in err
    assert not out.exists()


def test_expert_that_returns_a_bad_value_or_raises_is_a_one_line_error():
    with pytest.raises(UserError, match="returned str 'high'; expected a number"):
        callable_scorer(lambda p, r: "high", "m:f")(["p"], ["r"])
    with pytest.raises(UserError, match="returned nan; rewards must be finite"):
        callable_scorer(lambda p, r: float("nan"), "m:f")(["p"], ["r"])
    with pytest.raises(UserError, match="expert 'm:f' raised KeyError"):
        callable_scorer(lambda p, r: {}["x"], "m:f")(["p"], ["r"])
    assert callable_scorer(lambda p, r: len(r), "m:f")(["p", "q"], ["ab", "c"]) == [2.0, 1.0]


def test_task_variants_ask_only_their_kinds():
    compare = get_task("arithmetic-compare").make_prompts("train", 6, seed=0)
    sums = get_task("arithmetic-sums").make_prompts("train", 6, seed=0)
    assert all(p[-1]["content"].startswith("Which is") for p in compare)
    assert all(p[-1]["content"].startswith("What is") for p in sums)
    with pytest.raises(UserError, match="unknown question kind 'mul'"):
        A.make_prompts("train", 2, kinds=("mul",))


def test_success_probability_is_the_teacher_forced_probability_of_the_exact_answers():
    """For "What is 2 + 9?" (c = 11): pi("11" <end>) + pi("11." <end>), each the product of the
    next-token probabilities along the chat-rendered prompt, checked against a plain forward.
    The prompts (about 300 byte tokens) are encoded by the training encoder with room for all of
    them (max_prompt_length 512)."""
    import torch

    from softpo.config import DataConfig, ModelConfig
    from softpo.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(ModelConfig())
    model = load_model(ModelConfig(), tokenizer, seed=0).eval()
    prompts = [A.conversation("add", "What is 2 + 9?"),
               A.conversation("larger", "Which is larger, 5 or 40?")]
    whole = DataConfig(max_length=1024, max_prompt_length=512)
    got = A.success_probability(model, tokenizer, prompts, batch_size=3,  # batches split a prompt
                                data_cfg=whole)
    for prompt, p, c in zip(prompts, got, ("11", "40")):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        prefix = tokenizer(text, add_special_tokens=False)["input_ids"]
        expected = 0.0
        for form in (c, c + "."):
            response = tokenizer(form, add_special_tokens=False)["input_ids"] + \
                [tokenizer.eos_token_id]
            with torch.no_grad():
                logits = model(torch.tensor([prefix + response])).logits[0]  # (T, V)
            logps = logits[len(prefix) - 1:-1].log_softmax(-1)  # rows that predict the response
            expected += float(logps.gather(-1, torch.tensor(response)[:, None]).sum().exp())
        assert 0 < p == pytest.approx(expected, rel=1e-4)
