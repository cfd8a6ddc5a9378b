"""Engines (softpo/distributed.py). The Accelerate configs in configs/accelerate/ as `accelerate
launch` reads them, checked against what softpo can run (`engine_problem`); and FSDP2 on the CPU
(gloo), launched with configs/accelerate/fsdp.yaml as a user would: 2 processes end where 1 process
with the same global batch ends (full fine-tuning and LoRA, the global KL regulariser on), the
checkpoints are sharded, a SIGTERM-stopped run resumes bit for bit, and `final/` is a Hugging Face
folder holding the gathered weights. DeepSpeed cannot run here (no GPU, not installed): only its
configs are checked."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from launch import (ROOT, FSDP_CONFIG, assert_bitwise_equal, final_weights, last_logged_step,
                    launcher, one_thread, run, signal_at_step, stop_lines, train_args)
from softpo import checkpoint, cli, distributed
from softpo.errors import UserError

CONFIGS = ROOT / "configs" / "accelerate"


def launch_env(name: str) -> dict[str, str]:
    """The variables `accelerate launch --config_file configs/accelerate/<name>.yaml` gives its
    processes (Accelerate's own launcher code; the DeepSpeed launcher itself needs deepspeed)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        ["--config_file", str(CONFIGS / f"{name}.yaml"), "--num_processes", "2", "-m", "x"])
    args, defaults, _ = _validate_launch_command(args)
    if not args.use_deepspeed:
        return prepare_multi_gpu_env(args)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    return prepare_deepspeed_cmd_env(args)[1]


# ---------------------------------------------------------------- the configs and engine checks

@pytest.mark.parametrize("name, cuda, problem", [
    ("ddp", False, None), ("fsdp", False, None),
    ("deepspeed_zero2", True, None), ("deepspeed_zero2", False, "DeepSpeed needs GPUs"),
    ("deepspeed_zero3", True, "DeepSpeed ZeRO-3 is not supported")])
def test_the_shipped_configs_as_softpo_sees_them(name, cuda, problem):
    """Default options (train.grad_accum 1, optim.max_grad_norm 1.0) under each config."""
    found = distributed.engine_problem(1, 1.0, launch_env(name), cuda=cuda)
    assert found == problem if problem is None else found.startswith(problem)


def test_fsdp_config_is_the_tested_one():
    """FSDP2, sharded checkpoints (as softpo.distributed describes), no rank-0-only loading."""
    from accelerate.commands.config.config_args import load_config_from_file

    fsdp = load_config_from_file(str(FSDP_CONFIG)).fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_cpu_ram_efficient_loading"] is False
    assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    assert "fsdp_state_dict_type: SHARDED_STATE_DICT" in distributed.__doc__
    assert "tests/test_distributed.py" in FSDP_CONFIG.read_text()


@pytest.mark.parametrize("change, problem", [
    ({"FSDP_VERSION": "1"}, "softpo runs FSDP as FSDP2"),
    ({"FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}, "set fsdp_cpu_ram_efficient_loading: false")])
def test_fsdp_settings_softpo_cannot_run(change, problem):
    env = {**launch_env("fsdp"), **change}
    assert distributed.engine_problem(1, 1.0, env).startswith(problem)


def test_deepspeed_options_must_agree_with_softpo(tmp_path):
    env = launch_env("deepspeed_zero2")
    assert "keep train.grad_accum=1" in distributed.engine_problem(2, 1.0, env, cuda=True)
    steps = {**env, "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}
    assert "and 4)" in distributed.engine_problem(1, 1.0, steps, cuda=True)
    assert "must equal optim.max_grad_norm (0.5)" in distributed.engine_problem(1, 0.5, env,
                                                                                cuda=True)
    # a DeepSpeed JSON file named by the launch: its values win, "auto" is no constraint
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": "auto"}')
    named = {**env, "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds)}
    assert "ZeRO-3 is not supported" in distributed.engine_problem(1, 1.0, named, cuda=True)
    ds.write_text('{"zero_optimization": {"stage": 2}, "gradient_clipping": "auto"}')
    assert distributed.engine_problem(1, 0.5, named, cuda=True) is None
    ds.write_text("{not json")
    with pytest.raises(UserError, match="cannot read the DeepSpeed config"):
        distributed.engine_problem(1, 1.0, named, cuda=True)


def test_an_engine_softpo_cannot_run_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    for key, value in launch_env("deepspeed_zero3").items():
        if key.startswith("ACCELERATE_DEEPSPEED") or key == "ACCELERATE_USE_DEEPSPEED":
            monkeypatch.setenv(key, value)
    assert cli.main(train_args(tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ZeRO-3 is not supported" in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- FSDP2 on the CPU

MAX_STEPS = 8
# SPO with the global KL regulariser (samples every 3 steps), held-out evaluation (lockstep
# batches), a sharded checkpoint at step 4. Per process: 4 rows and 2 regulariser prompts.
ARGS = dict(loss__name="spo", loss__beta=0.1, regularizer__sample_every=3,
            regularizer__prompts_per_step=2, regularizer__max_new_tokens=8,
            train__max_steps=MAX_STEPS, train__batch_size=4, train__save_steps=4,
            train__eval_steps=4, data__eval_fraction=0.05)
# 2 processes x 4 rows after 8 steps at lr 1e-2, against 1 process x 8 rows: float summation
# order only (measured: max abs difference 3.2e-6 full fine-tuning, 5.4e-7 LoRA; DDP's test in
# tests/test_multiprocess.py uses the same tolerance).
TOLERANCE = dict(rtol=1e-4, atol=2e-5)


def one_process_drawing_as_two(out: Path, **overrides) -> Path:
    """The 1-process run with the same global batch (8 rows) whose regulariser draws what the 2
    processes draw together: each process seeds its own samples (softpo.regularizer), so this
    one draws rank 0's and rank 1's and scores them as one batch."""
    from softpo.config import load_config
    from softpo.trainer import Trainer

    args = train_args(out, **{**ARGS, "train__batch_size": 8, **overrides})
    with one_thread():
        trainer = Trainer(load_config(args[1], args[2:]))
        _draw_as_two(trainer)
        trainer.train()
    return out


def _draw_as_two(trainer) -> None:
    """At each refresh the trainer's regulariser draws rank 0's, then rank 1's samples."""
    reg, pad = trainer.regularizer, trainer.tokenizer.pad_token_id
    draw = reg.refresh

    def refresh(policy, step, rank, world, device):
        parts = []
        for r in range(2):
            draw(policy, step, r, 2, device)
            parts.append(reg.state.samples)
        reg.state = reg.view(joined(parts, pad))

    reg.refresh = refresh


def joined(parts: list, pad: int):
    """Sample batches of the same k, one after the other, padded to the widest."""
    from softpo.packing import Rows
    from softpo.sampling import SampleBatch

    width = max(p.rows.input_ids.shape[1] for p in parts)

    def cat(name: str, value: int) -> torch.Tensor:  # (S, width)
        ts = [getattr(p.rows, name) for p in parts]
        out = [torch.nn.functional.pad(t.long(), (0, width - t.shape[1]), value=value) for t in ts]
        return torch.cat(out).to(ts[0].dtype)

    rows = Rows(cat("input_ids", pad), cat("attention_mask", 0), cat("response_mask", 0))
    return SampleBatch(rows, sum(p.num_prompts for p in parts), parts[0].samples_per_prompt,
                       torch.cat([p.response_lengths for p in parts]),
                       torch.cat([p.finished for p in parts]))


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    """`accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2`, full
    fine-tuning, run to the end."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    run("fsdp", train_args(out, **ARGS))
    return out


def assert_close(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, **TOLERANCE, msg=name)


@pytest.mark.slow
def test_fsdp_equals_one_process(fsdp_run, tmp_path):
    one = one_process_drawing_as_two(tmp_path / "one")
    assert_close(final_weights(fsdp_run), final_weights(one))


@pytest.mark.slow
def test_fsdp_with_lora_equals_one_process(tmp_path):
    """LoRA: the reference is the policy with its adapter off, called with whole parameters."""
    two = tmp_path / "two"
    run("fsdp", train_args(two, **ARGS, lora__enabled=True, lora__r=4))
    one = one_process_drawing_as_two(tmp_path / "one", lora__enabled=True, lora__r=4)
    assert_close(final_weights(two), final_weights(one))


@pytest.mark.slow
def test_fsdp_checkpoints_are_sharded_and_final_is_a_plain_folder(fsdp_run):
    """Each process writes its shard of the weights and of the optimiser (torch.distributed.
    checkpoint); final/ loads with from_pretrained alone and holds the gathered weights, the
    tied output layer tied as in the one-process save."""
    from transformers import AutoModelForCausalLM

    step4 = checkpoint.step_dir(fsdp_run / "checkpoints", 4)
    assert checkpoint.is_complete(step4)
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert {p.name for p in (step4 / part).glob("*.distcp")} == {"__0_0.distcp",
                                                                      "__1_0.distcp"}
    assert not (step4 / "model.safetensors").exists()  # no whole copy of the weights
    saved = final_weights(fsdp_run)
    model = AutoModelForCausalLM.from_pretrained(fsdp_run / "final")
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert "lm_head.weight" not in saved
    state = model.state_dict()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name


@pytest.mark.slow
def test_fsdp_stopped_by_sigterm_resumes_exactly(fsdp_run, tmp_path):
    """SIGTERM to `accelerate launch`, which forwards it to both processes: they finish the
    step, write a sharded checkpoint and exit 75; the resumed run ends bit for bit where the
    uninterrupted one ends."""
    stopped = tmp_path / "stopped"
    code, stderr = signal_at_step([*launcher("fsdp"), *train_args(stopped, **ARGS)], stopped, 2,
                                  signal.SIGTERM)
    assert code != 0
    last = checkpoint.latest_complete(stopped / "checkpoints")
    step = int(last.name.split("-")[1])
    assert 2 <= step < MAX_STEPS and last_logged_step(stopped) >= step
    assert stop_lines(stderr) == [f"softpo: SIGTERM: stopped after step {step} of {MAX_STEPS}; "
                                  f"checkpoint written to {last}; continue with --resume "
                                  f"(exit code 75)"]
    assert (last / "pytorch_model_fsdp_0" / "__1_0.distcp").is_file()

    resumed = run("fsdp", train_args(stopped, **ARGS) + ["--resume"])
    assert f"resumed from step {step}" in resumed.stdout
    assert_bitwise_equal(final_weights(stopped), final_weights(fsdp_run))


def test_fsdp_online_spo_equals_one_process(tmp_path, monkeypatch):
    """Online SPO: the policy answers prompts with whole parameters at each refresh (every
    process draws what one process draws), the expert labels them; no regulariser."""
    from softpo.config import load_config
    from softpo.trainer import Trainer

    experts = ROOT / "examples" / "experts"
    online = dict(loss__beta=0, train__max_steps=6, online__enabled=True,
                  online__expert="concise:reward", online__every=2,
                  online__prompts_per_refresh=4, online__sample_batch=2, online__responses=3,
                  online__max_new_tokens=8, online__keep_ties=True)
    run("fsdp", train_args(tmp_path / "two", **{**ARGS, **online}),
        extra_env={"PYTHONPATH": f"{ROOT}{os.pathsep}{experts}"})
    monkeypatch.syspath_prepend(str(experts))
    args = train_args(tmp_path / "one", **{**ARGS, **online, "train__batch_size": 8})
    with one_thread():
        Trainer(load_config(args[1], args[2:])).train()
    assert_close(final_weights(tmp_path / "two"), final_weights(tmp_path / "one"))
