"""softpo.data / softpo.collate: readers, row kinds, tokenisation, truncation, collation, order.

The tokenizer is built here (no download): one token per byte (id = 5 + position in the ByteLevel
alphabet), specials <|pad|>=0 <|bos|>=1 <|eos|>=2 <|im_start|>=3 <|im_end|>=4, a post-processor that
prepends BOS (to test that BOS is never doubled) and a ChatML-like template that starts with BOS.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softpo.collate import (PreferenceBatch, TokenizedExample, collate, prompt_batch,
                            stream_indices, tokenize_example, tokenize_examples)
from softpo.config import DataConfig
from softpo.data import (BadRowError, DataReport, PreferenceExample, load_preferences,
                         prompts_from_examples, read_prompts)
from softpo.errors import UserError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PAD, BOS, EOS, IM_START, IM_END = 0, 1, 2, 3, 4


def make_tokenizer(template: str | None = TEMPLATE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
    vocab = {s: i for i, s in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A $B",
                                                       special_tokens=[("<|bos|>", BOS)])
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                pad_token="<|pad|>",
                                additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    t.chat_template = template
    return t


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def raw_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def load(path, **cfg) -> tuple[list[PreferenceExample], DataReport]:
    return load_preferences(str(path), DataConfig(**cfg))


def msgs(*pairs: str) -> list[dict]:
    return [{"role": r, "content": c} for r, c in zip(pairs[::2], pairs[1::2])]


# ---------------------------------------------------------------- readers

def test_jsonl_rows_are_file_lines_and_blank_lines_are_allowed(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n'
                    '{"prompt": "d", "chosen": "e", "rejected": "f"}\n', encoding="utf-8")
    examples, report = load(path)
    assert [(e.row, e.prompt, e.responses) for e in examples] == [(1, "a", ["b", "c"]),
                                                                  (3, "d", ["e", "f"])]
    assert (report.rows_read, report.rows_kept, report.kind) == (2, 2, "pairs")


def test_json_list_and_data_wrapper_give_record_numbers(tmp_path):
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "d", "chosen": "e",
                                                              "rejected": "f"}]
    (tmp_path / "l.json").write_text(json.dumps(rows), encoding="utf-8")
    (tmp_path / "d.json").write_text(json.dumps({"data": rows}), encoding="utf-8")
    a, _ = load(tmp_path / "l.json")
    b, _ = load(tmp_path / "d.json")
    assert [(e.row, e.responses) for e in a] == [(e.row, e.responses) for e in b] == \
        [(1, ["b", "c"]), (2, ["e", "f"])]


def test_csv_rows_are_starting_lines_and_json_cells_are_parsed(tmp_path):
    path = tmp_path / "b.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "responses", "best"])
        w.writerow(["two\nlines", json.dumps(["x", "y", "z"]), "2"])  # spans lines 2-3
        w.writerow([json.dumps(msgs("user", "hi")), json.dumps(["p", "q"]), "0"])  # line 4
    (first, second), report = load(path)
    assert (first.row, first.prompt, first.responses, first.kind) == \
        (2, "two\nlines", ["z", "x", "y"], "best_of_n")
    assert second.row == 4 and second.prompt == msgs("user", "hi")
    assert second.responses == [msgs("assistant", "p"), msgs("assistant", "q")]
    assert report.chat_rows == 1


def test_parquet_with_conversations(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": msgs("user", "q1"), "chosen": msgs("assistant", "good"),
             "rejected": msgs("assistant", "bad")}]
    pq.write_table(pa.Table.from_pylist(rows * 3), tmp_path / "c.parquet")
    examples, _ = load(tmp_path / "c.parquet")
    assert [e.row for e in examples] == [1, 2, 3]
    assert examples[0].prompt == msgs("user", "q1")
    assert examples[0].responses == [msgs("assistant", "good"), msgs("assistant", "bad")]


def test_hf_save_to_disk_folder_and_split(tmp_path):
    import datasets

    train = datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    test = datasets.Dataset.from_list([{"prompt": "t", "responses": ["u", "v"], "ranking": [1, 0]}])
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    (ex,), _ = load(tmp_path / "dd")
    assert (ex.prompt, ex.responses, ex.row) == ("a", ["b", "c"], 1)
    (ex,), report = load_preferences(str(tmp_path / "dd"), DataConfig(), split="test")
    assert (ex.responses, report.kind) == (["v", "u"], "ranked")
    with pytest.raises(UserError, match=r"no split 'dev' \(splits: train, test\)"):
        load(tmp_path / "dd", split="dev")


def test_folder_of_data_files_picks_the_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": "x", "chosen": "y", "rejected": "z"}])
    (ex,), _ = load(tmp_path, split="test")
    assert (ex.prompt, ex.source) == ("x", str(tmp_path / "test.jsonl"))


def test_missing_hub_dataset_offline_is_a_user_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"cannot load hub dataset 'nobody/no-such-prefs' split "
                                        r"'validation'.*offline mode is on"):
        load("nobody/no-such-prefs:validation")


def test_hub_name_with_split_goes_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    (ex,), _ = load("org/prefs:test")
    assert (ex.source, ex.row, ex.responses) == ("org/prefs:test", 1, ["b", "c"])
    load("org/prefs", split="dev")
    assert calls == [("org/prefs", "test"), ("org/prefs", "dev")]


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(UserError, match="nothere.jsonl: file not found"):
        load(tmp_path / "nothere.jsonl")
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(UserError, match=r"unknown file type '\.xml'"):
        load(tmp_path / "x.xml")


# ---------------------------------------------------------------- row kinds

def test_implicit_prompt_of_strings_cuts_at_whitespace(tmp_path):
    """Shared prefix 'Q: 2+2? A: ' ends in a space; the prompt stops before it so that the
    responses start with it (' 4', ' 5'), as a word-piece tokenizer would split them."""
    path = write_jsonl(tmp_path / "i.jsonl", [{"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"},
                                              {"chosen": "The cat sat", "rejected": "The car sat"}])
    (a, b), _ = load(path)
    assert (a.prompt, a.responses) == ("Q: 2+2? A:", [" 4", " 5"])
    assert (b.prompt, b.responses) == ("The", [" cat sat", " car sat"])


def test_implicit_prompt_of_conversations_is_the_shared_messages(tmp_path):
    shared = msgs("system", "be brief", "user", "hi")
    path = write_jsonl(tmp_path / "c.jsonl", [{"chosen": shared + msgs("assistant", "hello"),
                                               "rejected": shared + msgs("assistant", "go away")}])
    (ex,), _ = load(path)
    assert ex.prompt == shared and ex.is_chat
    assert ex.responses == [msgs("assistant", "hello"), msgs("assistant", "go away")]


def test_string_prompt_with_responses_that_repeat_it(tmp_path):
    """UltraFeedback-style rows: prompt string, chosen/rejected the whole conversation."""
    path = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "hi", "chosen": msgs("user", "hi",
                                                                               "assistant", "A"),
                                               "rejected": msgs("user", "hi", "assistant", "B")}])
    (ex,), _ = load(path)
    assert ex.prompt == msgs("user", "hi")
    assert ex.responses == [msgs("assistant", "A"), msgs("assistant", "B")]


def test_best_of_n_and_rankings_give_preference_order(tmp_path):
    """best=2 of [a, b, c] -> [c, a, b]; ranking [2, 0, 1] -> [c, a, b];
    scores [0.1, 0.9, 0.5] -> descending: index 1, 2, 0 -> [b, c, a]."""
    rs = ["a", "b", "c"]
    path = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "responses": rs, "best": 2}])
    assert load(path)[0][0].responses == ["c", "a", "b"]
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "responses": rs, "ranking": [2, 0, 1]},
                                              {"prompt": "p", "responses": rs,
                                               "scores": [0.1, 0.9, 0.5]}])
    (x, y), report = load(path)
    assert (x.responses, y.responses, x.kind) == (["c", "a", "b"], ["b", "c", "a"], "ranked")
    assert report.responses_per_row == {3: 2}


def test_skip_counts_bad_rows_by_reason(tmp_path):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "s.jsonl", [good, {"prompt": "p", "chosen": "a"}, good,
                                              {"prompt": "p", "chosen": "a", "rejected": "a"},
                                              {"prompt": "p", "responses": ["a", "b"], "best": 0}])
    with pytest.raises(BadRowError, match="s.jsonl:2: field 'rejected': missing"):
        load(path)
    examples, report = load(path, on_bad_rows="skip")
    assert [e.row for e in examples] == [1, 3]
    assert report.bad_rows == {"missing_field": 1, "identical_responses": 1, "mixed_kinds": 1}
    assert (report.rows_read, report.rows_kept, report.num_bad) == (5, 2, 3)
    assert report.messages[0].endswith("s.jsonl:2: field 'rejected': missing")
    write_jsonl(path, [{"prompt": "p", "chosen": "a"}])
    with pytest.raises(UserError, match=r"no usable rows \(1 bad rows skipped; first: "):
        load(path, on_bad_rows="skip")


# ---------------------------------------------------------------- tokenisation and truncation

def test_string_rows_get_one_bos_and_an_eos(tok):
    ex = PreferenceExample("ab", ["c", "de"], "f", 1)
    t = tokenize_example(ex, tok, DataConfig())
    assert t.prompt_ids == [BOS] + raw_ids(tok, "ab")
    assert t.response_ids == [raw_ids(tok, "c") + [EOS], raw_ids(tok, "de") + [EOS]]
    t = tokenize_example(PreferenceExample("<|bos|>ab", ["c", "d"]), tok, DataConfig())
    assert t.prompt_ids == [BOS] + raw_ids(tok, "ab")  # the text's own BOS is not doubled


def test_chat_rows_equal_the_template_rendering_of_the_whole_conversation(tok):
    prompt = msgs("system", "be brief", "user", "hi")
    responses = [msgs("assistant", "hello"), msgs("assistant", "bye", "user", "why?",
                                                  "assistant", "because")]
    t = tokenize_example(PreferenceExample(prompt, responses), tok, DataConfig())
    assert t.prompt_text == tok.apply_chat_template(prompt, tokenize=False,
                                                    add_generation_prompt=True)
    for r, ids in zip(responses, t.response_ids):
        full = tok.apply_chat_template(prompt + r, tokenize=False)
        assert t.prompt_ids + ids == raw_ids(tok, full)
    assert t.prompt_ids[:2] == [BOS, IM_START] and t.prompt_ids.count(BOS) == 1
    assert t.response_ids[0] == raw_ids(tok, "hello") + [IM_END] + raw_ids(tok, "\n")  # no EOS:
    # the template's own end-of-turn token ends the response


def test_plain_rendering_without_a_template(tok):
    """chat_template='never' (or no template): 'role: content' lines, then 'assistant: '."""
    ex = PreferenceExample(msgs("user", "hi"), [msgs("assistant", "yo"), msgs("assistant", "no")])
    for tokenizer, cfg in ((tok, DataConfig(chat_template="never")), (make_tokenizer(None),
                                                                      DataConfig())):
        t = tokenize_example(ex, tokenizer, cfg)
        assert t.prompt_text == "user: hi\nassistant: "
        assert t.prompt_ids == [BOS] + raw_ids(tok, "user: hi\nassistant: ")
        assert t.response_ids[0] == raw_ids(tok, "yo") + [EOS]


def test_template_that_rewrites_the_prompt_falls_back_with_a_warning():
    odd = make_tokenizer("{% if add_generation_prompt %}[gen]{% endif %}" + TEMPLATE)
    ex = PreferenceExample(msgs("user", "hi"), [msgs("assistant", "yo"), msgs("assistant", "no")])
    report = DataReport("x")
    with pytest.warns(UserWarning, match="renders the prompt differently"):
        (t,) = tokenize_examples([ex], odd, DataConfig(), report)
    assert t.template_fallback and report.rows_template_fallback == 1
    assert t.response_ids == [raw_ids(odd, "yo") + [EOS], raw_ids(odd, "no") + [EOS]]


def test_template_that_rejects_a_conversation_is_a_bad_row():
    strict = make_tokenizer("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no "
                            "system role') }}{% endif %}" + TEMPLATE)
    ex = PreferenceExample(msgs("system", "s", "user", "u"), [msgs("assistant", "a"),
                                                              msgs("assistant", "b")], "f.jsonl", 7)
    with pytest.raises(BadRowError, match="f.jsonl:7: field 'prompt': the chat template rejects "
                                          "this conversation.*no system role"):
        tokenize_example(ex, strict, DataConfig())


def test_truncation_rules_and_counts(tok):
    """max_length 16, max_prompt_length 4. Row 1: prompt 'abcdefghij' = BOS + 10 bytes = 11 tokens
    (< 16, > 4) keeps its last 4, 'ghij'; room for a response: 16 - 4 = 12 tokens; 'xyz' + EOS = 4
    fits, 'uvwxyz0123456' + EOS = 14 is cut to its first 12, 'uvwxyz012345' (its EOS is lost).
    Row 2 (prompt 'ab' = 3 tokens, responses 2 tokens each) is untouched. Row 3's prompt
    (BOS + 15 bytes = 16 >= max_length) leaves no room: a bad row."""
    rows = [PreferenceExample("abcdefghij", ["xyz", "uvwxyz0123456"], "f", 1),
            PreferenceExample("ab", ["c", "d"], "f", 2),
            PreferenceExample("123456789012345", ["c", "d"], "f", 3)]
    with pytest.raises(BadRowError, match="f:3: field 'prompt': has 16 tokens, at least "
                                          "max_length=16"):
        tokenize_examples(rows, tok, DataConfig(max_length=16, max_prompt_length=4))
    report = DataReport("f", rows_kept=3)
    skip = DataConfig(max_length=16, max_prompt_length=4, on_bad_rows="skip")
    t1, t2 = tokenize_examples(rows, tok, skip, report)
    assert t1.prompt_ids == raw_ids(tok, "ghij")
    assert t1.response_ids == [raw_ids(tok, "xyz") + [EOS], raw_ids(tok, "uvwxyz012345")]
    assert (t1.truncated_prompt, t1.truncated_response) == (True, True)
    assert (t2.truncated_prompt, t2.truncated_response) == (False, False)
    assert (report.rows_truncated_prompt, report.rows_truncated_response) == (1, 1)
    assert report.bad_rows == {"prompt_too_long": 1} and report.rows_kept == 2
    assert report.prompt_tokens == [4, 3] and report.response_tokens == [4, 12, 2, 2]


# ---------------------------------------------------------------- collation

def _tex(prompt, responses, kind="pairs"):
    return TokenizedExample(prompt, responses, kind, "f", 1, "text")


def test_collate_layout_by_hand():
    """A: prompt [5, 6], responses [7, 8, 9], [10]; B: prompt [11], responses [12], [13, 14], [15].
    n = 3, T = 5; row b * 3 + j; A's third row is padding (prompt only, not valid)."""
    batch = collate([_tex([5, 6], [[7, 8, 9], [10]]), _tex([11], [[12], [13, 14], [15]], "best_of_n")],
                    pad_token_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 6, 10, 0, 0], [5, 6, 0, 0, 0],
                                        [11, 12, 0, 0, 0], [11, 13, 14, 0, 0], [11, 15, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0],
                                             [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    assert batch.response_mask.int().tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 0, 0], [0] * 5,
                                                  [0, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 1, 0, 0, 0]]
    assert batch.response_valid.tolist() == [[True, True, False], [True, True, True]]
    assert batch.response_lengths.tolist() == [[3, 1, 0], [1, 2, 1]]
    assert (batch.batch_size, batch.num_responses) == (2, 3)
    assert batch.num_tokens == 5 + 3 + 2 + 2 + 3 + 2
    moved = batch.to("cpu")
    assert isinstance(moved, PreferenceBatch) and torch.equal(moved.input_ids, batch.input_ids)
    assert collate([_tex([1], [[2], [3]])], 0, pad_to_multiple_of=4).input_ids.shape == (2, 4)


def test_response_mask_gives_the_summed_response_logps():
    """With logits[r, t] predicting input_ids[r, t + 1], the masked sum of
    log_softmax(logits[r, t - 1])[input_ids[r, t]] equals a direct per-response sum."""
    batch = collate([_tex([5, 6], [[7, 8, 9], [10]])], pad_token_id=0)
    logits = torch.randn(2, 5, 16)
    logp = torch.log_softmax(logits, -1)
    token_logps = torch.zeros(2, 5)
    token_logps[:, 1:] = logp[:, :-1].gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    summed = (token_logps * batch.response_mask).sum(-1)
    expected = [logp[0, 1, 7] + logp[0, 2, 8] + logp[0, 3, 9], logp[1, 1, 10]]
    assert torch.allclose(summed, torch.stack(expected))


def test_stream_indices_are_seeded_epoch_permutations():
    """Positions 0..9 of the stream over range(4) are epoch 0's permutation, epoch 1's, then the
    first half of epoch 2's; epoch e's permutation is torch.randperm(4) seeded seed * 100003 + e.
    Any window of the stream equals the same slice of the whole stream (a resumed run, or one of
    N processes, reads exactly what the uninterrupted one-process run reads there)."""
    def perm(seed, epoch):
        return torch.randperm(4, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))

    whole = stream_indices(4, 0, 10, seed=3)
    assert whole == perm(3, 0).tolist() + perm(3, 1).tolist() + perm(3, 2).tolist()[:2]
    assert sorted(whole[:4]) == sorted(whole[4:8]) == [0, 1, 2, 3]  # each epoch: every row once
    assert all(stream_indices(4, start, 3, seed=3) == whole[start:start + 3] for start in range(8))
    assert stream_indices(4, 0, 10, seed=4) != whole
    # two processes of batch 2 (process r reads positions 2 * (2 * step + r) ...) together read
    # what one process of batch 4 reads
    one = [stream_indices(4, 4 * step, 4, 3) for step in range(2)]
    two = [stream_indices(4, 4 * step, 2, 3) + stream_indices(4, 4 * step + 2, 2, 3)
           for step in range(2)]
    assert one == two


def test_prompt_batch_is_left_padded_and_truncated(tok):
    ids, mask = prompt_batch(["ab", msgs("user", "hi")], tok, DataConfig(max_prompt_length=6,
                                                                       max_length=8))
    chat = raw_ids(tok, tok.apply_chat_template(msgs("user", "hi"), tokenize=False,
                                                add_generation_prompt=True))[-6:]
    assert ids.tolist() == [[PAD, PAD, PAD, BOS] + raw_ids(tok, "ab"), chat]
    assert mask.tolist() == [[0, 0, 0, 1, 1, 1], [1] * 6]


# ---------------------------------------------------------------- regulariser prompts

def test_read_prompts_txt_and_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\n  \nsecond line\r\n", encoding="utf-8")
    assert read_prompts(str(tmp_path / "p.txt")) == ["first", "second line"]
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": msgs("user", "b")}])
    assert read_prompts(str(path)) == ["a", msgs("user", "b")]
    write_jsonl(path, [{"prompt": "a"}, {"promt": "b"}])
    with pytest.raises(UserError, match=r"p.jsonl:2: field 'prompt': missing \(did you mean "
                                        r"'promt'\?\)"):
        read_prompts(str(path))
    examples, _ = load(EXAMPLES / "pairs.jsonl")
    prompts = prompts_from_examples(examples + examples)
    assert prompts == [e.prompt for e in examples]


def test_example_files_load_with_their_kinds():
    kinds = {"pairs": "pairs", "chat_pairs": "pairs", "best_of_n": "best_of_n", "ranked": "ranked"}
    for name, kind in kinds.items():
        examples, report = load(EXAMPLES / f"{name}.jsonl")
        assert report.kind == kind and 5 <= len(examples) <= 10 and report.num_bad == 0


# ---------------------------------------------------------------- properties

texts = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=12).filter(
    lambda s: s.strip() and not s.lstrip().startswith("[{"))  # a CSV cell "[{...}]" is JSON


@st.composite
def rows(draw):
    kind = draw(st.sampled_from(["pairs", "best_of_n", "ranking", "scores"]))
    n = 2 if kind == "pairs" else draw(st.integers(2, 4))
    prompt, *responses = draw(st.lists(texts, min_size=n + 1, max_size=n + 1, unique=True))
    if kind == "pairs":
        return {"prompt": prompt, "chosen": responses[0], "rejected": responses[1]}, responses
    if kind == "best_of_n":
        best = draw(st.integers(0, n - 1))
        return ({"prompt": prompt, "responses": responses, "best": best},
                [responses[best]] + responses[:best] + responses[best + 1:])
    order = draw(st.permutations(range(n)))
    if kind == "ranking":
        return {"prompt": prompt, "responses": responses, "ranking": order}, \
            [responses[i] for i in order]
    scores = [0.0] * n
    for rank, i in enumerate(order):
        scores[i] = float(n - rank)  # the response ranked first gets the highest score
    return {"prompt": prompt, "responses": responses, "scores": scores}, \
        [responses[i] for i in order]


def _write(fmt: str, path: Path, records: list[dict]) -> Path:
    if fmt == "jsonl":
        return write_jsonl(path.with_suffix(".jsonl"), records)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path.with_suffix(".parquet"))
        return path.with_suffix(".parquet")
    with open(path.with_suffix(".csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(records[0]))
        w.writeheader()
        w.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()}
                    for r in records)
    return path.with_suffix(".csv")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind_rows=st.integers(1, 4).flatmap(lambda k: st.lists(rows(), min_size=k, max_size=k)),
       fmt=st.sampled_from(["jsonl", "csv", "parquet"]))
def test_readers_round_trip_valid_rows(tmp_path, kind_rows, fmt):
    keys = tuple(kind_rows[0][0])  # one kind per file: keep the rows shaped like the first
    kind_rows = [r for r in kind_rows if tuple(r[0]) == keys]
    path = _write(fmt, tmp_path / "rows", [r for r, _ in kind_rows])
    examples, report = load(path)
    assert [e.responses for e in examples] == [expected for _, expected in kind_rows]
    assert [e.prompt for e in examples] == [r["prompt"] for r, _ in kind_rows]
    assert report.rows_kept == len(kind_rows) and report.num_bad == 0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(1, 50), min_size=1, max_size=6),
                          st.lists(st.lists(st.integers(1, 50), max_size=5), min_size=1,
                                   max_size=4)), min_size=1, max_size=4))
def test_collator_masks_and_padding(spec):
    examples = [_tex(p, rs) for p, rs in spec]
    batch = collate(examples, pad_token_id=0)
    B, n = len(examples), max(len(rs) for _, rs in spec)
    R, T = batch.input_ids.shape
    assert R == B * n and batch.response_mask.shape == batch.attention_mask.shape == (R, T)
    assert T == max(len(p) + len(r) for p, rs in spec for r in rs)
    sums = batch.response_mask.sum(-1).view(B, n)
    assert torch.equal(sums, batch.response_lengths)
    assert not (batch.response_mask & (batch.attention_mask == 0)).any()
    assert not batch.response_mask[:, 0].any()
    for b, (p, rs) in enumerate(spec):
        assert batch.response_valid[b].tolist() == [j < len(rs) for j in range(n)]
        for j, r in enumerate(rs):
            row = batch.input_ids[b * n + j]
            assert row[:len(p) + len(r)].tolist() == p + r
            assert (row[len(p) + len(r):] == 0).all()
