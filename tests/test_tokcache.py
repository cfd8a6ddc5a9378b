"""The tokenised set on disk (softpo/tokcache.py): a second load reads the entry instead of reading,
validating and tokenising, and gives equal examples, prompts and report counts; a changed file,
setting or tokenizer misses it; a damaged or half-written entry is never read; `data.cache_tokens`
and `softpo data check --no-cache` turn it off.

`tokenize_stream` is replaced by one that fails in the loads that must hit the entry, so a hit is
seen, not inferred from timing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from softpo import cli, collate, tokcache
from softpo.build import load_data
from softpo.collate import collect
from softpo.config import DataConfig, load_config
from softpo.data import BadRowError
from softpo.errors import UserError
from softpo.losses import get_loss
from softpo.models import byte_tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
REWRITES = "{% if add_generation_prompt %}[gen]{% endif %}" + CHATML  # the template fallback
SKIP = DataConfig(max_length=64, max_prompt_length=24, on_bad_rows="skip")


def msgs(*pairs: str) -> list[dict]:
    return [{"role": r, "content": c} for r, c in zip(pairs[::2], pairs[1::2])]


def rows(n: int = 24) -> list[dict]:
    """String and conversational pairs, a prompt cut at 24 tokens with a response cut at 40, a
    prompt of 70 >= 64 tokens (row 6: a bad row when tokenised); `write` adds a malformed line."""
    out = []
    for i in range(n):
        if i % 3 == 0:
            out.append({"prompt": msgs("system", "be brief", "user", f"question {i}?"),
                        "chosen": msgs("assistant", f"answer {i}"), "rejected": msgs("assistant", "no")})
        else:
            out.append({"prompt": f"prompt {i}", "chosen": f" good {i}", "rejected": f" bad {i}"})
    out[4] = {"prompt": "a prompt longer than twenty-four bytes", "chosen": "y" * 80, "rejected": "z"}
    out[5]["prompt"] = "p" * 70  # >= max_length tokens: a bad row when tokenised
    return out


def write(path: Path, records: list, bad_line: bool = True) -> Path:
    lines = [json.dumps(r) for r in records] + (["{not json"] if bad_line else [])
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def tok():
    return byte_tokenizer()


@pytest.fixture
def no_tokenising(monkeypatch):
    """Call it to make any further tokenising fail (the load must be a hit)."""
    def forbid():
        def fail(*a, **k):
            raise AssertionError("tokenised again: the entry should have been read")
        monkeypatch.setattr(tokcache, "tokenize_stream", fail)
    return forbid


def entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def same(a: tokcache.TokenizedSource, b: tokcache.TokenizedSource) -> None:
    assert a.prompts == b.prompts
    assert [str(r) if isinstance(r, BadRowError) else r for r in a.results] == \
        [str(r) if isinstance(r, BadRowError) else r for r in b.results]
    assert a.report == b.report


def test_second_load_reads_the_entry(tmp_path, tok, no_tokenising, _token_cache):
    path = write(tmp_path / "p.jsonl", rows())
    first = tokcache.load_tokenized(str(path), tok, SKIP)
    assert len(entries(_token_cache)) == 1
    fresh = tokcache.load_tokenized(str(path), tok, SKIP, cache=False)
    no_tokenising()
    second = tokcache.load_tokenized(str(path), tok, SKIP)
    same(second, first)
    same(second, fresh)
    assert isinstance(second.prompts[0], list) and second.results[0].prompt_text.startswith("<|im")
    kept = [collect(s.results, SKIP, s.report) for s in (first, second)]
    assert kept[0] == kept[1] and len(kept[0]) == 23
    assert first.report.summary() == second.report.summary()
    assert (second.report.rows_read, second.report.rows_kept, second.report.num_bad) == (25, 23, 2)
    assert second.report.rows_truncated_prompt and second.report.rows_truncated_response
    assert set(second.report.bad_rows) == {"malformed_json", "prompt_too_long"}


def test_a_run_start_up_equals_the_uncached_one(tmp_path, tok, no_tokenising):
    """`load_data` (the held-out split, the regulariser's prompts, the reports) is the same from
    the entry, whatever the seed: the split is made after the cached step."""
    path = write(tmp_path / "p.jsonl", rows(40))

    def start(seed: int, cache: bool):
        cfg = load_config(None, [f"data.train={path}", "data.max_length=64", "data.on_bad_rows=skip",
                                 "data.max_prompt_length=24", f"data.cache_tokens={cache}",
                                 f"train.seed={seed}"])
        return load_data(cfg, tok, get_loss("spo"))

    expected = {seed: start(seed, False) for seed in (0, 1)}
    start(0, True)
    no_tokenising()
    for seed in (0, 1):
        got, want = start(seed, True), expected[seed]
        assert got.train_set == want.train_set and got.eval_set == want.eval_set
        assert got.reg_prompts == want.reg_prompts
        assert len(got.train_set) + len(got.eval_set) == 39 and got.eval_set
        assert [r.summary() for r in got.reports] == [r.summary() for r in want.reports]


def test_what_changes_the_tokens_misses_the_entry(tmp_path, tok, _token_cache, monkeypatch):
    monkeypatch.setattr(collate, "_warned", set())
    path = write(tmp_path / "p.jsonl", rows())
    other = byte_tokenizer()
    other.chat_template = REWRITES
    loads = [(tok, SKIP), (tok, DataConfig(**{**SKIP.__dict__, "max_length": 48})),
             (tok, DataConfig(**{**SKIP.__dict__, "max_prompt_length": 20})),
             (tok, DataConfig(**{**SKIP.__dict__, "chat_template": "never"})), (other, SKIP)]
    for n, (tokenizer, cfg) in enumerate(loads, 1):
        with pytest.warns(UserWarning) if tokenizer is other else _nothing():
            got = tokcache.load_tokenized(str(path), tokenizer, cfg)
        assert len(entries(_token_cache)) == n
        same(got, tokcache.load_tokenized(str(path), tokenizer, cfg, cache=False))
    write(path, rows()[:-1])  # a changed file
    got = tokcache.load_tokenized(str(path), tok, SKIP)
    assert len(entries(_token_cache)) == len(loads) + 1 and got.report.rows_read == 24
    tokcache.load_tokenized(str(path), byte_tokenizer(), SKIP)  # an equal tokenizer: a hit
    assert len(entries(_token_cache)) == len(loads) + 1


def _nothing():
    import contextlib

    return contextlib.nullcontext()


@pytest.mark.parametrize("damage", ["truncated", "flipped", "garbage", "empty"])
def test_a_damaged_entry_is_rebuilt(tmp_path, tok, _token_cache, damage):
    path = write(tmp_path / "p.jsonl", rows())
    first = tokcache.load_tokenized(str(path), tok, SKIP)
    (entry,) = entries(_token_cache)
    data = entry.read_bytes()
    entry.write_bytes({"truncated": data[:len(data) // 2], "empty": b"",
                       "flipped": data[:-10] + bytes([data[-10] ^ 1]) + data[-9:],
                       "garbage": b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}  "}[damage])
    assert tokcache.read_entry(entry, tok) is None
    again = tokcache.load_tokenized(str(path), tok, SKIP)
    same(again, first)
    assert entry.read_bytes() == data  # written again, whole
    assert tokcache.read_entry(entry, tok) is not None


def test_a_killed_write_leaves_no_entry(tmp_path, tok, monkeypatch, _token_cache):
    path = write(tmp_path / "p.jsonl", rows())
    blocks = tokcache._blocks

    def dies_midway(*args):
        it = blocks(*args)
        yield next(it)
        raise KeyboardInterrupt  # the run is stopped while it writes

    monkeypatch.setattr(tokcache, "_blocks", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        tokcache.load_tokenized(str(path), tok, SKIP)
    assert list(_token_cache.iterdir()) == []  # no entry, no temporary file
    monkeypatch.setattr(tokcache, "_blocks", blocks)
    (_token_cache / ".leftover.safetensors.tmp-1").write_bytes(b"half")  # from a SIGKILL
    same(tokcache.load_tokenized(str(path), tok, SKIP),
         tokcache.load_tokenized(str(path), tok, SKIP, cache=False))
    assert len(entries(_token_cache)) == 1


def test_errors_and_warnings_come_back_from_the_entry(tmp_path, no_tokenising, monkeypatch):
    """on_bad_rows=error: the first bad row's error, from the entry too; the template fallback
    warns on a hit as on the first load."""
    monkeypatch.setattr(collate, "_warned", set())  # tokenizers warned in other tests are gone
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = REWRITES
    records = rows()
    path = write(tmp_path / "p.jsonl", records, bad_line=False)
    strict = DataConfig(max_length=64, max_prompt_length=24)
    messages = []
    for _ in range(2):
        with pytest.warns(UserWarning, match="renders the prompt differently"):
            src = tokcache.load_tokenized(str(path), tokenizer, strict)
        with pytest.raises(BadRowError) as e:
            collect(src.results, strict, src.report)
        messages.append(str(e.value))
        tokenizer = byte_tokenizer()  # a new object: it warns again
        tokenizer.chat_template = REWRITES
        no_tokenising()
    assert messages[0] == messages[1] and messages[0].startswith(f"{path}:6: field 'prompt': has 70")


def test_rows_in_memory_and_folders(tmp_path, tok, no_tokenising, _token_cache):
    folder = tmp_path / "data"
    folder.mkdir()
    write(folder / "a.jsonl", rows(12), bad_line=False)
    write(folder / "b.jsonl", rows(12)[6:], bad_line=False)
    records = rows(12)
    fresh = [tokcache.load_tokenized(s, tok, SKIP) for s in (str(folder), records)]
    assert len(entries(_token_cache)) == 2
    write(folder / "c.jsonl", rows(12)[:2], bad_line=False)  # one more file: the folder changed
    tokcache.load_tokenized(str(folder), tok, SKIP)
    assert len(entries(_token_cache)) == 3
    (folder / "c.jsonl").unlink()
    no_tokenising()
    for source, want in zip((str(folder), records), fresh):
        same(tokcache.load_tokenized(source, tok, SKIP), want)
    assert {r.source for r in fresh[0].results} == {str(folder / "a.jsonl"), str(folder / "b.jsonl")}


def test_cache_off_or_unwritable(tmp_path, tok, _token_cache):
    path = write(tmp_path / "p.jsonl", rows())
    want = tokcache.load_tokenized(str(path), tok, DataConfig(**{**SKIP.__dict__,
                                                                 "cache_tokens": False}))
    assert entries(_token_cache) == []
    assert tokcache.tokenizer_digest(object()) is None  # no fast backend: never cached
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    with pytest.warns(UserWarning, match="p.jsonl were not cached"):  # the run goes on
        got = tokcache.load_tokenized(str(path), tok, SKIP, cache_dir=blocked)
    same(got, want)


def test_data_check_reads_and_writes_the_entry(tmp_path, capsys, monkeypatch, _token_cache):
    path = write(tmp_path / "p.jsonl", rows())
    args = ["data", "check", str(path), "--tokenizer", "tiny", "--skip-bad-rows",
            "--max-length", "64", "--max-prompt-length", "24"]
    assert cli.main(args + ["--no-cache"]) == 0
    uncached = capsys.readouterr().out
    assert entries(_token_cache) == [] and "25 rows read, 23 kept, 2 bad" in uncached
    assert cli.main(args) == 0 and len(entries(_token_cache)) == 1
    monkeypatch.setattr(tokcache, "tokenize_stream", None)  # a hit tokenises nothing
    assert cli.main(args) == 0
    assert capsys.readouterr().out == uncached * 2


def test_no_usable_rows_is_still_one_error(tmp_path, tok):
    path = write(tmp_path / "p.jsonl", [], bad_line=True)
    with pytest.raises(UserError, match=r"p.jsonl: no usable rows \(1 bad rows skipped; first: "):
        tokcache.load_tokenized(str(path), tok, SKIP)
