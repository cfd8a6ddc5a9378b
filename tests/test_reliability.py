"""Reliability and security (issue 7) end to end through `softpo train`, `softpo sample` and the
trainer: bad inputs at every entry point, the non-finite guard, checkpoint failures seen from the
command line, and the security defaults (safetensors only, weights_only, no remote code, safe YAML
in tests/test_config.py, reward callables only from the module the user names).

Runs are tiny (1 layer, 32 wide, byte tokenizer, a handful of steps). See docs/reliability.md for
the guarantee -> test table.
"""

from __future__ import annotations

import ast
import dataclasses
import errno
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softpo import checkpoint, cli
from softpo.collate import collate, tokenize_example
from softpo.config import DataConfig, ModelConfig, TinyModelConfig, load_config
from softpo.data import BadRowError, PreferenceExample, load_preferences, read_prompts
from softpo.errors import NonFiniteError, UserError
from softpo.losses import LOSSES, LossOutput
from softpo.tracking import read_metrics
from softpo.trainer import Trainer

FIXTURE_OK = [HealthCheck.function_scoped_fixture]  # tmp_path is reused across examples
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "prefs_tiny.jsonl"
BAD = ROOT / "tests" / "bad_inputs"
CONFIG = str(ROOT / "configs" / "tiny.yaml")


def overrides(run: Path, **extra) -> list[str]:
    base = {
        "data.train": str(DATA), "data.max_length": 64, "data.max_prompt_length": 32,
        "data.eval_fraction": 0, "model.tiny.n_layer": 1, "model.tiny.n_embd": 32,
        "model.tiny.n_head": 2, "train.output_dir": str(run), "train.max_steps": 4,
        "train.batch_size": 4, "train.logging_steps": 1, "train.eval_steps": 0,
        "train.save_steps": 0, "train.progress": False, "train.report_to": "[jsonl]",
        "loss.beta": 0.0, "regularizer.prompts_per_step": 2, "regularizer.max_new_tokens": 4,
        "optim.lr": 1e-2, "optim.warmup_steps": 0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def train(capsys, run: Path, **extra) -> tuple[int, str, str]:
    rc = cli.main(["train", CONFIG, *overrides(run, **extra)])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str) -> str:
    """The CLI's error: exactly one `softpo: error:` line, last, and no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert sum(line.startswith("softpo: error: ") for line in lines) == 1 and \
        lines[-1].startswith("softpo: error: "), err
    return lines[-1][len("softpo: error: "):]


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines),
                    encoding="utf-8")
    return path


# ---------------------------------------------------------------- 1. bad data through `train`

def test_prompt_longer_than_max_length_stops_train(capsys, tmp_path):
    """`prompt_too_long.jsonl` row 1 has a 40-byte prompt = 40 byte-level tokens."""
    path = BAD / "prompt_too_long.jsonl"
    rc, out, err = train(capsys, tmp_path / "run", **{"data.train": path, "data.max_length": 40,
                                                      "data.max_prompt_length": 8})
    assert rc == 2
    assert err == (f"softpo: error: {path}:1: field 'prompt': has 40 tokens, at least "
                   "max_length=40, leaving no room for a response\n")
    assert not (tmp_path / "run" / "final").exists()


def test_bad_data_through_train_subprocess(tmp_path):
    path = BAD / "chosen_equals_rejected.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "softpo.cli", "train", CONFIG,
                           *overrides(tmp_path / "run", **{"data.train": path})],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=180)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"softpo: error: {path}:3: field 'rejected': is identical to 'chosen'\n"


def test_missing_hub_dataset_through_train(capsys, tmp_path):
    rc, _, err = train(capsys, tmp_path / "run", **{"data.train": "nobody/no-such-prefs"})
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("softpo: error: nobody/no-such-prefs: cannot load hub dataset "
                          "'nobody/no-such-prefs' split 'train'")


def mixed_file(tmp_path: Path) -> Path:
    """12 good rows, then: malformed JSON (line 13), no 'rejected' (14), a 70-byte prompt (15),
    which is >= max_length=64 tokens."""
    good = DATA.read_text(encoding="utf-8").splitlines()[:12]
    return write_jsonl(tmp_path / "mixed.jsonl", [*good, '{"prompt": "x", "chosen": ',
                                                  {"prompt": "p", "chosen": "a"},
                                                  {"prompt": "p" * 70, "chosen": "a",
                                                   "rejected": "b"}])


def test_bad_rows_are_fatal_by_default(capsys, tmp_path):
    path = mixed_file(tmp_path)
    rc, _, err = train(capsys, tmp_path / "run", **{"data.train": path})
    assert rc == 2
    assert err == (f"softpo: error: {path}:13: not valid JSON (Expecting value at column 27)\n")


def test_skipped_rows_are_counted_and_reported_by_train(capsys, tmp_path):
    path = mixed_file(tmp_path)
    rc, out, err = train(capsys, tmp_path / "run", **{"data.train": path,
                                                      "data.on_bad_rows": "skip",
                                                      "train.max_steps": 1})
    assert rc == 0, err
    assert f"{path}: pairs, 15 rows read, 12 kept, 3 bad" in out
    assert "skipped rows: malformed_json 1, missing_field 1, prompt_too_long 1" in out
    assert f"{path}:14: field 'rejected': missing" in out
    assert f"{path}:15: field 'prompt': has 70 tokens, at least max_length=64" in out


# ---------------------------------------------------------------- 1b. prompt files

PROMPT_FILES = {  # name -> (content bytes, message after the path)
    "empty.txt": (b"", ": no prompts: the file is empty"),
    "blank.txt": (b"\n  \n\t\n", ": no prompts: the file is empty"),
    "non_utf8.txt": (b"fine\nbad \xff byte\n", ":2: not valid UTF-8 (byte 0xff at column 5)"),
    "missing_field.jsonl": (b'{"prompt": "a"}\n{"promt": "b"}\n',
                            ":2: field 'prompt': missing (did you mean 'promt'?)"),
    "wrong_type.jsonl": (b'{"prompt": 3}\n', ":1: field 'prompt': must be a string or a list of "
                                             "{role, content} messages, got number"),
    "empty_prompt.jsonl": (b'{"prompt": "a"}\n{"prompt": "  "}\n',
                           ":2: field 'prompt': is whitespace only"),
    "malformed.jsonl": (b'{"prompt": "a"}\n{"prompt": \n',
                        ":2: not valid JSON (Expecting value at column 12)"),
    "empty.jsonl": (b"", ": no prompts: the file is empty"),
    "prompts.xml": (b"<a/>", ": unknown file type '.xml' (known: .jsonl, .ndjson, .json, .csv, "
                             ".parquet)"),
}


@pytest.mark.parametrize("name", sorted(PROMPT_FILES))
def test_bad_prompt_files(tmp_path, name):
    content, message = PROMPT_FILES[name]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError) as info:
        read_prompts(str(path))
    assert str(info.value).startswith(f"{path}{message}")
    with pytest.raises(UserError, match="file not found"):
        read_prompts(str(tmp_path / "missing.txt"))


def test_bad_prompt_file_through_train_and_sample(capsys, tmp_path):
    path = tmp_path / "reg.jsonl"
    path.write_bytes(PROMPT_FILES["missing_field.jsonl"][0])
    want = f"softpo: error: {path}:2: field 'prompt': missing (did you mean 'promt'?)\n"
    rc, _, err = train(capsys, tmp_path / "run", **{"data.regularizer_prompts": path})
    assert (rc, err) == (2, want)
    assert cli.main(["sample", "tiny", "--prompts", str(path)]) == 2
    assert capsys.readouterr().err == want


# ---------------------------------------------------------------- 1c. reward callables

@pytest.mark.parametrize("spec", ["__import__('os').system('touch PWNED'):x", "os:system('x')",
                                  "m:f; touch PWNED", "m:f()", " m:f", "m.f", "m:f:g", "m:",
                                  ":f", "m/x:f", "m:f\nx"])
def test_reward_specs_are_names_never_code(spec, tmp_path, monkeypatch):
    """A spec is matched against `package.module:function` before anything is imported; it is
    never evaluated."""
    from softpo.tasks.experts import load_callable

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="must look like package.module:function"):
        load_callable(spec)
    assert not (tmp_path / "PWNED").exists()


def test_reward_spec_imports_only_the_module_it_names(tmp_path, monkeypatch):
    from softpo.tasks.experts import load_callable

    pkg = tmp_path / "softpo_probe_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "rewards.py").write_text("def reward(prompt, response):\n    return 1.0\n")
    (pkg / "other.py").write_text("open('PWNED', 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    fn = load_callable("softpo_probe_pkg.rewards:reward")
    assert fn("p", "r") == 1.0
    assert "softpo_probe_pkg.other" not in sys.modules and not (tmp_path / "PWNED").exists()


def test_the_working_directory_cannot_shadow_installed_modules(tmp_path):
    """Run like the `softpo` console script (no working directory on sys.path, `python -P`):
    naming `myexpert:reward` from the working directory puts it on sys.path *last*, so a
    `softpo_shadow_probe.py` there does not replace the installed one imported afterwards (as
    transformers is imported after the expert by `softpo build-prefs`)."""
    site, work = tmp_path / "site", tmp_path / "work"
    site.mkdir(), work.mkdir()
    (site / "softpo_shadow_probe.py").write_text("WHERE = 'installed'\n")
    (work / "softpo_shadow_probe.py").write_text("WHERE = 'working directory'\n")
    (work / "myexpert.py").write_text("def reward(prompt, response):\n    return 2.0\n")
    script = ("from softpo.tasks.experts import load_callable\n"
              "assert load_callable('myexpert:reward')('p', 'r') == 2.0\n"
              "import softpo_shadow_probe\nprint(softpo_shadow_probe.WHERE)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(site)])}
    proc = subprocess.run([sys.executable, "-P", "-c", script], capture_output=True, text=True,
                          cwd=work, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "installed"


# ---------------------------------------------------------------- 2. numerical guards

def nan_loss(spec, first_bad_call: int, last_bad_call: int = 10**9):
    """`spec` whose loss is NaN on calls first_bad_call..last_bad_call (0-based)."""
    calls = []

    def fn(logps, params):
        out = spec.fn(logps, params)
        bad = first_bad_call <= len(calls) <= last_bad_call
        calls.append(bad)
        return LossOutput(out.losses * float("nan"), out.stats) if bad else out

    return dataclasses.replace(spec, fn=fn)


def test_nonfinite_run_stops_with_its_last_good_checkpoint(capsys, tmp_path, monkeypatch):
    """Steps 0-2 are finite (checkpoint at step 2), steps 3, 4, 5 are NaN: the run stops at the
    third in a row (max_nonfinite_steps=3). The save due after step 4 is not written, so with
    save_total_limit=1 the step-2 checkpoint is not pruned; it is complete and finite."""
    monkeypatch.setitem(LOSSES, "spo", nan_loss(LOSSES["spo"], 3))
    run = tmp_path / "run"  # no pre-training saturation check: it would count as loss calls
    rc, _, err = train(capsys, run, **{"train.max_steps": 10, "train.save_steps": 2,
                                       "train.save_total_limit": 1,
                                       "train.max_nonfinite_steps": 3,
                                       "train.saturation_check": 0})
    good = run / "checkpoints" / "step-0000002"
    assert rc == 2
    assert one_error_line(err) == ("3 consecutive steps with non-finite loss or gradients at step "
                                   f"5 (lower optim.lr?); last good checkpoint: {good}")
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000002"]
    assert checkpoint.is_complete(good)
    assert all(torch.isfinite(t).all() for t in weights(good / "model.safetensors").values())
    logged = {r["step"]: r["nonfinite_steps"] for r in read_metrics(run / "metrics.jsonl")}
    assert logged == {1: 0.0, 2: 0.0, 3: 0.0, 4: 1.0, 5: 2.0}
    assert not (run / "final").exists()


def test_huge_learning_rate_stops_cleanly(capsys, tmp_path):
    """lr = 1e30: the first update is finite but absurd, every later step overflows."""
    run = tmp_path / "run"
    rc, _, err = train(capsys, run, **{"optim.lr": 1e30, "optim.scheduler": "constant",
                                       "train.max_steps": 10, "train.save_steps": 1,
                                       "train.max_nonfinite_steps": 2})
    assert rc == 2
    message = one_error_line(err)
    assert message.startswith("2 consecutive steps with non-finite loss or gradients at step 2 "
                              "(lower optim.lr?); last good checkpoint: ")
    last = Path(message.split("last good checkpoint: ")[1])
    assert last == run / "checkpoints" / "step-0000001" and checkpoint.is_complete(last)
    assert all(torch.isfinite(t).all() for t in weights(last / "model.safetensors").values())


@pytest.fixture
def trainer(tmp_path) -> Trainer:
    """A fresh trainer for each test: none depends on what another did to its weights or state."""
    return Trainer(load_config(CONFIG, overrides(tmp_path / "guard", **{"train.max_steps": 100})))


def snapshot(t: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in t.acc.unwrap_model(t.scorer).state_dict().items()}


def test_a_nonfinite_loss_step_is_skipped_and_counted(trainer, monkeypatch):
    t = trainer
    t.train_step()  # Adam state exists from here on
    before, adam_steps = snapshot(t), t.optimizer.state_dict()["state"][0]["step"].clone()
    monkeypatch.setattr(t, "spec", nan_loss(t.spec, 0, 0))  # the next step only
    total = t.nonfinite_total
    metrics = t.train_step()
    assert metrics["nonfinite_steps"] == total + 1 and t.nonfinite_in_a_row == 1
    after = snapshot(t)
    assert all(torch.equal(before[k], after[k]) for k in before)  # no update
    assert torch.equal(t.optimizer.state_dict()["state"][0]["step"], adam_steps)
    t.train_step()  # finite again: the update happens and the streak resets
    assert t.nonfinite_in_a_row == 0 and t.nonfinite_total == total + 1
    assert any(not torch.equal(before[k], v) for k, v in snapshot(t).items())


def test_a_nonfinite_gradient_with_a_finite_loss_is_caught(trainer):
    t = trainer
    param = next(p for p in t.scorer.parameters() if p.requires_grad)
    handle = param.register_hook(lambda g: g * float("inf"))
    before, total = snapshot(t), t.nonfinite_total
    try:
        metrics = t.train_step()
    finally:
        handle.remove()
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert metrics["nonfinite_steps"] == total + 1
    assert all(torch.equal(before[k], v) for k, v in snapshot(t).items())


def test_nonfinite_parameters_are_never_saved(trainer, tmp_path):
    t = trainer
    t.run_dir = tmp_path / "run"
    t.nonfinite_in_a_row = 0
    t.save_checkpoint()
    good = checkpoint.latest_complete(t.run_dir / "checkpoints")
    assert good is not None
    param = next(p for p in t.scorer.parameters())
    with torch.no_grad():
        old = param.view(-1)[0].item()
        param.view(-1)[0] = float("nan")
    try:
        t.step += 1
        t.save_checkpoint()  # refused: the step-good checkpoint stays the latest
        assert checkpoint.latest_complete(t.run_dir / "checkpoints") == good
        with pytest.raises(NonFiniteError, match=f"final model was not saved; last good "
                                                 f"checkpoint: {good}"):
            t.save_final({})
        assert not (t.run_dir / "final").exists()
    finally:
        with torch.no_grad():
            param.view(-1)[0] = old


# ---------------------------------------------------------------- 3. crash safety via the CLI

def test_failed_checkpoint_write_exits_2_and_keeps_the_previous(capsys, tmp_path, monkeypatch):
    """The second save hits a full disk (ENOSPC) half-way through Accelerate's save_state."""
    real_save, calls = checkpoint.save, []

    def save(root, step, save_state, *args, **kwargs):
        calls.append(step)

        def failing(d):
            save_state(d)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(root, step, failing, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", save)
    run = tmp_path / "run"
    rc, _, err = train(capsys, run, **{"train.max_steps": 6, "train.save_steps": 2,
                                       "train.save_total_limit": 1})
    previous = run / "checkpoints" / "step-0000002"
    assert rc == 2 and calls == [2, 4]
    assert one_error_line(err) == ("could not write checkpoint for step 4: No space left on "
                                   f"device; the previous checkpoint {previous} is intact")
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000002"]
    assert checkpoint.is_complete(previous)


def test_resume_skips_a_corrupt_checkpoint_and_loads_only_with_weights_only(tmp_path,
                                                                             monkeypatch):
    """Checkpoints at steps 2 and 4; one flipped byte in step 4's weights (same size) makes the
    resume use step 2. Every torch.load during the resume has weights_only=True."""
    args = overrides(tmp_path / "run", **{"train.save_steps": 2, "train.max_steps": 5,
                                          "train.save_total_limit": 2})
    Trainer(load_config(CONFIG, args)).train()
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000002", "step-0000004"]
    target = ckpts / "step-0000004" / "model.safetensors"
    body = bytearray(target.read_bytes())
    body[len(body) // 2] ^= 0x01
    target.write_bytes(bytes(body))

    real_load, calls = torch.load, []

    def recording_load(*a, **kw):
        calls.append(kw.get("weights_only"))
        return real_load(*a, **kw)

    monkeypatch.setattr(torch, "load", recording_load)
    resumed = Trainer(load_config(CONFIG, args + ["train.resume=true"]))
    assert resumed.resume() and resumed.step == 2
    assert calls and all(w is True for w in calls)


# ---------------------------------------------------------------- 4. security defaults

UNSAFE_CALLS = {("pickle", "load"), ("pickle", "loads"), ("marshal", "loads"), ("yaml", "load"),
                ("yaml", "unsafe_load"), ("yaml", "full_load"), ("yaml", "load_all"),
                ("dill", "load"), ("dill", "loads")}


def unsafe_calls(source: str) -> list[str]:
    """Calls that can run code from data: torch.load without weights_only=True, pickle/yaml
    loaders other than safe_load, eval/exec, and literal trust_remote_code=True or
    use_safetensors=False / safe_serialization=False."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        f, kw = node.func, {k.arg: k.value for k in node.keywords}
        name = (f.value.id, f.attr) if isinstance(f, ast.Attribute) and \
            isinstance(f.value, ast.Name) else (None, getattr(f, "id", None))
        if name == ("torch", "load"):
            flag = kw.get("weights_only")
            ok = isinstance(flag, ast.Constant) and flag.value is True
            if not ok:
                problems.append(f"line {node.lineno}: torch.load without weights_only=True")
        if name in UNSAFE_CALLS or name[1] in ("eval", "exec") and name[0] is None:
            problems.append(f"line {node.lineno}: {'.'.join(filter(None, name))}")
        for key, bad in (("trust_remote_code", True), ("use_safetensors", False),
                         ("safe_serialization", False)):
            if isinstance(kw.get(key), ast.Constant) and kw[key].value is bad:
                problems.append(f"line {node.lineno}: {key}={bad}")
    return problems


def test_the_scanner_finds_unsafe_calls():
    bad = ("torch.load(f)\ntorch.load(f, weights_only=False)\npickle.loads(b)\nyaml.load(s)\n"
           "eval(x)\nm.from_pretrained(p, trust_remote_code=True)\n"
           "m.from_pretrained(p, use_safetensors=False)\ntorch.load(f, weights_only=True)\n"
           "yaml.safe_load(s)\n")
    assert [p.split(":")[0] for p in unsafe_calls(bad)] == [f"line {i}" for i in range(1, 8)]


def test_softpo_source_has_no_unsafe_loading():
    files = sorted((ROOT / "softpo").rglob("*.py"))
    assert len(files) > 10
    found = {str(f.relative_to(ROOT)): unsafe_calls(f.read_text(encoding="utf-8")) for f in files}
    assert {f: p for f, p in found.items() if p} == {}
    text = "\n".join(f.read_text(encoding="utf-8") for f in files)
    assert "from torch import load" not in text and "UnsafeLoader" not in text


class Boom:
    """Unpickling this runs `touch MARKER`: what a hostile pytorch_model.bin can do."""

    marker = ""

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def hostile_bin(folder: Path, marker: Path) -> None:
    Boom.marker = str(marker)
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": Boom()}))


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    from softpo.models import build_tiny_model, byte_tokenizer, save_pretrained_atomic

    tok = byte_tokenizer()
    model = build_tiny_model(TinyModelConfig(n_layer=1, n_embd=32, n_head=2, n_positions=64),
                             tok, seed=0)
    folder = save_pretrained_atomic(model, tok, tmp_path_factory.mktemp("m") / "tiny")
    return folder, model, tok


def test_pickle_weights_are_never_unpickled(saved_tiny, tmp_path, capsys):
    """A folder with only a hostile .bin is refused (one line, exit 2) before anything reads it;
    a folder with safetensors *and* a hostile .bin loads the safetensors and ignores the .bin."""
    from softpo.models import load_model

    folder, model, tok = saved_tiny
    bin_only, marker = tmp_path / "bin_only", tmp_path / "PWNED"
    bin_only.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (bin_only / name).write_bytes((folder / name).read_bytes())
    hostile_bin(bin_only, marker)
    assert cli.main(["sample", str(bin_only), "--prompt", "hi"]) == 2
    assert one_error_line(capsys.readouterr().err).startswith(
        f"model '{bin_only}' has only pickle weights (pytorch_model.bin); softpo loads weights "
        "only from safetensors")
    assert not marker.exists()

    both = tmp_path / "both"
    both.mkdir()
    for f in folder.iterdir():
        (both / f.name).write_bytes(f.read_bytes())
    hostile_bin(both, marker)
    loaded = load_model(ModelConfig(name_or_path=str(both)), tok, seed=0)
    assert not marker.exists()
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_remote_code_is_off_unless_turned_on(saved_tiny, monkeypatch):
    import transformers

    from softpo.models import load_model, load_tokenizer

    folder, model, tok = saved_tiny
    seen = []

    def capture(result):
        def from_pretrained(*args, **kwargs):
            seen.append(kwargs)
            return result
        return from_pretrained

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", capture(model))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", capture(tok))
    default = ModelConfig(name_or_path=str(folder))
    assert default.trust_remote_code is False
    load_tokenizer(default)
    load_model(default, tok, seed=0)
    assert [kw["trust_remote_code"] for kw in seen] == [False, False]
    assert seen[1]["use_safetensors"] is True
    seen.clear()
    load_model(dataclasses.replace(default, trust_remote_code=True), tok, seed=0)
    assert seen[0]["trust_remote_code"] is True and seen[0]["use_safetensors"] is True


# ---------------------------------------------------------------- 5. properties (hypothesis)

GOOD_ROW = b'{"prompt": "p", "chosen": "a", "rejected": "b"}'
JSONISH = st.sampled_from([b"{", b"}", b"[", b"]", b'"', b":", b",", b"\\", b"\n", b"\r\n",
                           b" ", b"\xff", b"\xc3", b"\x00", b"null", b"1e999", b"NaN",
                           b'"prompt"', b'"chosen"', b'"rejected"', b'"responses"', b'"best"',
                           b'"ranking"', b'"scores"', b"[0, 1]", b'"x"', b"\xef\xbb\xbf",
                           GOOD_ROW])
FILE_BYTES = st.lists(JSONISH, max_size=40).map(b"".join) | st.binary(max_size=200)


@settings(max_examples=300, deadline=None, suppress_health_check=FIXTURE_OK)
@given(body=FILE_BYTES, suffix=st.sampled_from([".jsonl", ".json", ".csv"]),
       skip=st.booleans())
def test_any_file_is_rows_or_a_located_user_error(tmp_path, body, suffix, skip):
    """Whatever the bytes, reading gives examples or a one-line UserError naming the file; with
    on_bad_rows=skip every row read is either kept or counted as bad."""
    path = tmp_path / f"f{suffix}"
    path.write_bytes(body)
    try:
        examples, report = load_preferences(str(path), DataConfig(on_bad_rows="skip" if skip
                                                                  else "error"))
    except UserError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e)
        return
    assert examples and report.rows_read == report.rows_kept + report.num_bad
    assert all(len(ex.responses) >= 2 and ex.row >= 1 for ex in examples)


@pytest.fixture(scope="module")
def byte_tok():
    from softpo.models import byte_tokenizer

    return byte_tokenizer()


texts = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=30).filter(
    str.strip)


@settings(max_examples=200, deadline=None, suppress_health_check=FIXTURE_OK)
@given(prompt=texts, responses=st.lists(texts, min_size=2, max_size=4, unique=True),
       max_length=st.integers(2, 40), data=st.data())
def test_tokenize_and_collate_respect_the_length_limits(byte_tok, prompt, responses, max_length,
                                                        data):
    """A prompt of >= max_length tokens is a located bad row; otherwise the prompt keeps its last
    max_prompt_length tokens, each response fits in max_length - len(prompt), and the collated
    batch holds exactly those tokens in its response mask."""
    max_prompt = data.draw(st.integers(1, max_length - 1))
    cfg = DataConfig(max_length=max_length, max_prompt_length=max_prompt)
    ex = PreferenceExample(prompt, responses, "f.jsonl", 7, "ranked")
    full_prompt = byte_tok(prompt, add_special_tokens=True)["input_ids"]
    try:
        tok = tokenize_example(ex, byte_tok, cfg)
    except BadRowError as e:
        assert len(full_prompt) >= max_length and e.reason == "prompt_too_long"
        assert str(e).startswith("f.jsonl:7: field 'prompt': has ")
        return
    assert len(full_prompt) < max_length
    assert tok.prompt_ids == full_prompt[-max_prompt:]
    assert tok.truncated_prompt == (len(full_prompt) > max_prompt)
    room = max_length - len(tok.prompt_ids)
    for text, ids in zip(responses, tok.response_ids):
        whole = byte_tok(text, add_special_tokens=False)["input_ids"] + [byte_tok.eos_token_id]
        assert ids == whole[:room]
    batch = collate([tok], pad_token_id=byte_tok.pad_token_id)
    assert batch.input_ids.shape[1] <= max_length
    assert batch.response_lengths[0].tolist() == [len(r) for r in tok.response_ids]
