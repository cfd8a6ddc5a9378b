"""The bad-input corpus (tests/bad_inputs/, one file per case): each gives a `UserError` naming
file, row and field, and `softpo data check FILE` exits 2 with exactly one line on stderr.

Rows are 1-based file lines (JSONL, CSV) or record numbers; `prompt_too_long.jsonl` has a 40-byte
prompt, i.e. 40 tokens under the byte-level `tiny` tokenizer (no BOS), checked with max_length 40.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from softpo.cli import main
from softpo.config import DataConfig
from softpo.data import load_preferences
from softpo.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
BAD = ROOT / "tests" / "bad_inputs"
TINY = ["--tokenizer", "tiny", "--max-length", "40", "--max-prompt-length", "8"]

# file -> (expected message after "FILE", extra `data check` arguments)
CASES = {
    "malformed_json_line.jsonl": (":3: not valid JSON (Expecting ',' delimiter at column 31)", []),
    "malformed_json_file.json": (":4: not valid JSON (Expecting ',' delimiter at column 1)", []),
    "not_an_object.jsonl": (":1: a row must be a JSON object, got string", []),
    "missing_field.jsonl": (":2: field 'rejected': missing", []),
    "misspelt_field.jsonl": (":1: field 'rejected': missing (did you mean 'rejectd'?)", []),
    "wrong_type.jsonl": (":2: field 'chosen': must be a string or a list of {role, content} "
                         "messages, got number", []),
    "empty_text.jsonl": (":2: field 'rejected': is empty", []),
    "whitespace_text.jsonl": (":1: field 'prompt': is whitespace only", []),
    "chosen_equals_rejected.jsonl": (":3: field 'rejected': is identical to 'chosen'", []),
    "ranking_not_permutation.jsonl": (":1: field 'ranking': [0, 0, 2] is not a permutation of "
                                      "0..2 (missing [1], repeated or out of range [0])", []),
    "best_out_of_range.jsonl": (":2: field 'best': 3 is out of range for 3 responses "
                                "(indices 0..2)", []),
    "best_not_integer.jsonl": (":1: field 'best': must be an integer index, got string 'first'",
                               []),
    "too_few_responses.jsonl": (":1: field 'responses': has 1 response(s); at least 2 needed", []),
    "tied_scores.jsonl": (":1: field 'scores': responses 0 and 2 tie at 0.5", []),
    "mixed_kinds.jsonl": (":2: row is best_of_n but earlier rows are pairs", []),
    "no_shared_prompt.jsonl": (":1: field 'prompt': missing, and 'chosen' and 'rejected' share no "
                               "leading text", []),
    "unknown_kind.jsonl": (":1: cannot tell the row kind from its fields (answer, question)", []),
    "non_utf8.jsonl": (":2: field 'chosen': not valid UTF-8 (byte 0xff at column 43)", []),
    "empty.jsonl": (": no rows: the file is empty", []),
    "bad_csv.csv": (":1: field 'rejected': missing (columns: prompt, chosen)", []),
    "ragged_csv.csv": (":3: field 'rejected': has 2 cells but the header has 3 columns", []),
    "bad_role.jsonl": (":1: field 'chosen[0].role': unknown role 'bot'", []),
    "message_missing_content.jsonl": (":1: field 'prompt[0].content': missing", []),
    "prompt_too_long.jsonl": (":1: field 'prompt': has 40 tokens, at least max_length=40", TINY),
}
SUBPROCESS = {"malformed_json_line.jsonl", "non_utf8.jsonl"}  # the rest run in-process


def test_corpus_and_cases_match():
    assert sorted(p.name for p in BAD.iterdir()) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(set(CASES) - {"prompt_too_long.jsonl"}))
def test_reading_raises_a_located_user_error(name):
    path = str(BAD / name)
    with pytest.raises(UserError) as info:
        load_preferences(path, DataConfig())
    assert str(info.value).startswith(path + CASES[name][0])


@pytest.mark.parametrize("name", sorted(set(CASES) - SUBPROCESS))
def test_check_prints_one_line_and_exits_2(name, capsys):
    path = str(BAD / name)
    assert main(["data", "check", path, *CASES[name][1]]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"softpo: error: {path}{CASES[name][0]}")
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("name", sorted(SUBPROCESS))
def test_check_command_line_exit_code_2(name):
    path = str(BAD / name)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "softpo.cli", "data", "check", path,
                           *CASES[name][1]], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(f"softpo: error: {path}{CASES[name][0]}")
    assert proc.stderr.count("\n") == 1


def test_skip_bad_rows_counts_them(tmp_path, capsys):
    """Five rows: 1 and 4 are good; 2 is malformed JSON, 3 misses 'rejected', 5 is whitespace."""
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([good, '{"prompt": ', json.dumps({"prompt": "p", "chosen": "a"}),
                               good, json.dumps({"prompt": " ", "chosen": "a", "rejected": "b"})])
                    + "\n", encoding="utf-8")
    assert main(["data", "check", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"softpo: error: {path}:2: not valid JSON")
    assert main(["data", "check", str(path), "--skip-bad-rows", *TINY]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert f"{path}: pairs, 5 rows read, 2 kept, 3 bad" in out
    assert "skipped rows: malformed_json 1, missing_field 1, empty_text 1" in out
    assert f"{path}:3: field 'rejected': missing" in out


def test_check_summarises_the_example_files(capsys):
    """Token statistics: the byte tokenizer gives one token per byte."""
    files = [str(ROOT / "examples" / "data" / f"{n}.jsonl") for n in
             ("pairs", "chat_pairs", "best_of_n", "ranked")]
    assert main(["data", "check", *files, "--tokenizer", "tiny"]) == 0
    out = capsys.readouterr().out
    assert out.count("0 bad") == 4 and out.count("prompt tokens: min") == 4
    assert "best_of_n, 5 rows read, 5 kept" in out and "ranked, 5 rows read, 5 kept" in out


def test_check_with_one_bad_file_still_reports_the_good_ones(capsys):
    good = str(ROOT / "examples" / "data" / "pairs.jsonl")
    assert main(["data", "check", good, str(BAD / "empty.jsonl")]) == 2
    out, err = capsys.readouterr()
    assert out.startswith(f"{good}: pairs, 8 rows read") and err.count("\n") == 1
