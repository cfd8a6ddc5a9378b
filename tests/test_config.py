"""softpo.config as an entry point: YAML files and dotted command-line overrides.

Every bad config is a `UserError`: one line on stderr, exit code 2, naming the file (or "command
line") and the key. The corpus in tests/bad_configs/ has one file per case; the properties at the
end check that *no* override string and no YAML text can get past the parser as anything but a
valid config or a `UserError`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softpo.cli import main
from softpo.config import Config, load_config, validate
from softpo.errors import UserError

FIXTURE_OK = [HealthCheck.function_scoped_fixture]  # tmp_path is reused across examples
ROOT = Path(__file__).resolve().parents[1]
BAD = ROOT / "tests" / "bad_configs"

# file -> the message after "softpo: error: FILE"
CASES = {
    "unknown_key.yaml": ": unknown config key 'loss.alpah' (did you mean 'alpha'?)",
    "unknown_section.yaml": ": unknown config section 'trian' (did you mean 'train'?)",
    "value_not_section.yaml": ": config key 'loss.alpha' is a value, not a section",
    "wrong_type_int.yaml": ": config key 'train.batch_size': expected int, got 'eight'",
    "wrong_type_float.yaml": ": config key 'loss.alpha': expected float, got [1.0]",
    "wrong_type_bool.yaml": ": config key 'train.resume': expected bool, got 'maybe'",
    "wrong_list_item.yaml": ": config key 'optim.adam_betas[1]': expected float, got 'high'",
    "section_not_mapping.yaml": ": config key 'loss': expected a section (mapping of keys), got 3",
    "top_level_list.yaml": ": top level must be a mapping of sections",
    "alpha_zero.yaml": ": config key 'loss.alpha': must be > 0, got 0.0",
    "alpha_negative.yaml": ": config key 'loss.alpha': must be > 0, got -0.5",
    "beta_negative.yaml": ": config key 'loss.beta': must be >= 0, got -0.1",
    "dpo_beta_zero.yaml": ": config key 'loss.beta': must be > 0 for dpo (it is the inverse "
                          "temperature)",
    "unknown_loss.yaml": ": config key 'loss.name': unknown loss 'spoo' (known: cdpo, cpo, dpo,",
    "batch_size_zero.yaml": ": config key 'train.batch_size': must be >= 1",
    "grad_accum_zero.yaml": ": config key 'train.grad_accum': must be >= 1",
    "lr_nan.yaml": ": config key 'optim.lr': must be a finite number, got nan",
    "lr_overflow.yaml": ": config key 'optim.lr': must be a finite number, got '1e999'",
    "adam_betas_one.yaml": ": config key 'optim.adam_betas': must be two numbers in [0, 1), "
                           "got [0.9]",
    "on_bad_rows_unknown.yaml": ": config key 'data.on_bad_rows': must be error or skip",
    "prompt_length_not_below_max.yaml": ": config key 'data.max_prompt_length': must be > 0 and "
                                        "< data.max_length",
    "tiny_positions_too_short.yaml": ": config key 'model.tiny.n_positions': 32 is shorter than "
                                     "the longest sequence (64: data.max_length",
    "unknown_sink.yaml": ": config key 'train.report_to': known sinks are tensorboard, jsonl, "
                         "wandb, mlflow, trackio, got ['neptune']",
    "empty_output_dir.yaml": ": config key 'train.output_dir': must not be empty",
    "python_tag.yaml": ":1: not valid YAML (ConstructorError: could not determine a constructor "
                       "for the tag 'tag:yaml.org,2002:python/object/apply:os.system')",
    "syntax_error.yaml": ":3: not valid YAML (ParserError: expected ',' or ']', but got "
                         "'<stream end>')",
    "not_utf8.yaml": ":2: not valid UTF-8 (byte 0xff); save the file as UTF-8",
}
SUBPROCESS = ["python_tag.yaml"]  # the rest run in-process


def run_cli(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "softpo.cli", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=120)


def test_corpus_and_cases_match():
    assert sorted(p.name for p in BAD.iterdir()) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_config_is_one_line_and_exit_2(name, capsys):
    path = str(BAD / name)
    assert main(["train", path]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"softpo: error: {path}{CASES[name]}")
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("name", SUBPROCESS)
def test_bad_config_from_the_command_line(name, tmp_path):
    """As a user runs it. The python tag would run `touch softpo_yaml_marker` in the working
    directory if the file were read with an unsafe loader; safe_load refuses the tag."""
    path = str(BAD / name)
    proc = run_cli(["train", path], cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(f"softpo: error: {path}{CASES[name]}")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "softpo_yaml_marker").exists()


def test_missing_config_file(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert err == f"softpo: error: {tmp_path / 'nope.yaml'}: config file not found\n"


# ---------------------------------------------------------------- overrides

OVERRIDES = {
    "loss.alpha=0": "command line: config key 'loss.alpha': must be > 0, got 0.0",
    "loss.alpha=-1": "command line: config key 'loss.alpha': must be > 0, got -1.0",
    "loss.beta=-0.1": "command line: config key 'loss.beta': must be >= 0, got -0.1",
    "train.batch_size=0": "command line: config key 'train.batch_size': must be >= 1",
    "train.batch_size=2.5": "command line: config key 'train.batch_size': expected int, got 2.5",
    "train.batch_size=true": "command line: config key 'train.batch_size': expected int, got True",
    "loss.alpha=yes": "command line: config key 'loss.alpha': expected float, got True",
    "loss.alpha=nan": "command line: config key 'loss.alpha': expected float, got 'nan'",
    "loss.alpha=.inf": "command line: config key 'loss.alpha': must be a finite number, got inf",
    "loss.alpah=1": "command line: unknown config key 'loss.alpah' (did you mean 'alpha'?)",
    "lose.alpha=1": "command line: unknown config section 'lose' (did you mean 'loss'?)",
    "loss.alpha.x=1": "command line: config key 'loss.alpha' is a value, not a section",
    "loss.alpha": "override 'loss.alpha' must look like section.key=value",
    "=3": "override '=3' must look like section.key=value",
    "optim.adam_betas=[0.9, x]": "command line: config key 'optim.adam_betas[1]': expected "
                                 "float, got 'x'",
    "lora.target_modules=[1]": "command line: config key 'lora.target_modules[0]': expected "
                               "str, got 1",
    "optim.max_grad_norm=-1": "command line: config key 'optim.max_grad_norm': must be >= 0 "
                              "(0 disables clipping)",
    "train.max_nonfinite_steps=0": "command line: config key 'train.max_nonfinite_steps': must "
                                   "be >= 1",
    "loss={alpha: -2}": "command line: config key 'loss.alpha': must be > 0, got -2.0",
    "loss.f_divergence=tv": "command line: config key 'loss.f_divergence': must be one of "
                            "reverse_kl, forward_kl, js_divergence, got 'tv'",
}


@pytest.mark.parametrize("override", sorted(OVERRIDES))
def test_bad_override_is_a_user_error(override):
    with pytest.raises(UserError) as info:
        load_config(None, [override])
    assert str(info.value) == OVERRIDES[override]


def test_bad_override_through_the_cli(capsys):
    config = str(ROOT / "configs" / "tiny.yaml")
    assert main(["train", config, "train.batch_size=0"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == ("softpo: error: command line: config key 'train.batch_size': "
                                 "must be >= 1\n")


def test_errors_name_where_the_value_came_from(tmp_path):
    """The file when the file set it, "command line" when an override did (a later override of
    the whole section included), nothing when it is a default gone out of range."""
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  alpha: -1\n  beta: 0.5\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{path}: config key 'loss.alpha'"):
        load_config(path)
    with pytest.raises(UserError, match=r"^command line: config key 'loss.alpha'"):
        load_config(path, ["loss={alpha: -3}"])
    with pytest.raises(UserError, match=r"^config key 'data.max_prompt_length'"):
        load_config(None, ["data.max_length=200"])  # the default 256 is now too long
    assert load_config(path, ["loss.alpha=2"]).loss.alpha == 2.0


def test_file_then_overrides_then_validation():
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["loss.alpha=0.25", "optim.lr=1e-4",
                                                       "train.report_to=[jsonl]"])
    assert (cfg.loss.alpha, cfg.optim.lr, cfg.train.report_to) == (0.25, 1e-4, ["jsonl"])
    assert cfg.model.tiny.n_layer == 2  # from the file
    validate(Config())  # the defaults are valid


# ---------------------------------------------------------------- properties

def leaf_fields(cls: type = Config, prefix: str = "") -> dict[str, typing.Any]:
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(leaf_fields(tp, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = tp
    return out


KEYS = sorted(leaf_fields())


def parse(overrides: list[str]) -> Config | None:
    """The config, or None when it is a UserError; anything else propagates and fails."""
    try:
        return load_config(None, overrides)
    except UserError as e:
        assert "\n" not in str(e)  # one line
        return None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_any_override_string_is_a_config_or_a_user_error(text):
    parse([text])


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(KEYS) | st.text(st.sampled_from("abcdelmnopst._"), max_size=20),
       value=st.text(max_size=20) | st.sampled_from([".nan", "-.inf", "1e999", "[]", "{}", "null",
                                                      "[1, [2]]", "{a: 1}", "!!binary aGk=",
                                                      "0x10", "1_000", "2001-12-14", "~"]))
def test_any_key_and_value_is_a_config_or_a_user_error(key, value):
    parse([f"{key}={value}"])


@settings(max_examples=100, deadline=None, suppress_health_check=FIXTURE_OK)
@given(st.text(max_size=80) | st.binary(max_size=40).map(lambda b: b.decode("latin-1")))
def test_any_yaml_text_is_a_config_or_a_user_error(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        load_config(path)
    except UserError as e:
        assert "\n" not in str(e)


FLOAT_KEYS = {"loss.alpha": (1e-6, 1e6), "loss.beta": (0.0, 1e6), "loss.gamma": (-1e3, 1e3),
              "optim.lr": (1e-12, 10.0), "optim.weight_decay": (0.0, 1.0)}


@settings(max_examples=200, deadline=None)
@given(key=st.sampled_from(sorted(FLOAT_KEYS)), data=st.data())
def test_float_overrides_round_trip(key, data):
    """`repr(x)` of any finite float in range parses back to exactly x, including forms YAML 1.1
    reads as strings (`1e-05`) and integers for float keys."""
    lo, hi = FLOAT_KEYS[key]
    x = data.draw(st.floats(lo, hi, allow_nan=False, allow_infinity=False).filter(
        lambda v: not (key == "loss.alpha" and v <= 0)))
    section, name = key.split(".")
    for text in (repr(x), f"{x:e}", str(int(x)) if x == int(x) else repr(x)):
        cfg = load_config(None, [f"{key}={text}"])
        got = getattr(getattr(cfg, section), name)
        assert isinstance(got, float) and got == float(text) and math.isfinite(got)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 10**9), key=st.sampled_from(["train.max_steps", "train.batch_size",
                                                      "train.grad_accum", "train.logging_steps"]))
def test_int_overrides_round_trip(n, key):
    section, name = key.split(".")
    assert getattr(getattr(load_config(None, [f"{key}={n}"]), section), name) == n
    assert parse([f"{key}={n}.5"]) is None and parse([f"{key}={-n}"]) is None


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=8),
                max_size=4))
def test_list_overrides_round_trip_through_yaml(items):
    """A list written as YAML flow text comes back item for item (strings stay strings)."""
    text = yaml.safe_dump(items, default_flow_style=True, width=10**6).strip()
    cfg = parse([f"lora.target_modules={text}"])
    assert cfg is not None and cfg.lora.target_modules == items


def test_full_logits_needs_padded_rows():
    assert load_config(None, ["model.full_logits=true"]).model.full_logits is True
    with pytest.raises(UserError, match=r"config key 'model.full_logits'.*model.packing=none"):
        load_config(None, ["model.full_logits=true", "model.packing=shared_prompt"])
