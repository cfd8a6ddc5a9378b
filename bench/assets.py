"""Models, tokenizers and data for the benchmark, built once into a cache folder and reused.

* `word` cases: a randomly initialised model (seed 0) saved as safetensors with a word-level tokenizer
  whose token i is the word `w<i>` (ids 0 and 1 are `<pad>` and `<eos>`), so a text of k words is
  exactly k tokens for softpo and for TRL alike.
* `default` (SmolLM2): the cached folder from `softpo.models.fetch_default()`; texts are made of
  words that are one token each with a leading space, and prompts start with the BOS token so that
  every pipeline (softpo, TRL DPO, TRL CPO) produces the same ids.

Data: `rows_needed` rows of `{"prompt", "chosen", "rejected"}`, lengths drawn uniformly from the
ranges of the run's `bench.cases.Workload` with a fixed seed; their token lengths are written next to them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from bench.cases import DEFAULT_WORKLOAD, Case, Workload

PAD, EOS = "<pad>", "<eos>"


def cache_dir() -> Path:
    from softpo.models import cache_root

    return cache_root() / "bench"


def model_path(case: Case) -> Path:
    if case.source == "default":
        from softpo.models import fetch_default

        return fetch_default(progress=False)
    folder = cache_dir() / "models" / _shape_key(case)
    if not (folder / "done").is_file():
        _build_word_model(case, folder)
    return folder


def _shape_key(case: Case) -> str:
    return "-".join(f"{k}{v}" for k, v in sorted(case.shape.items()))


def word_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {PAD: 0, EOS: 1, **{f"w{i}": i for i in range(2, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS,
                                   model_max_length=1 << 20)


def _build_word_model(case: Case, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, GPT2Config, LlamaConfig

    s = case.shape
    ids = dict(pad_token_id=0, eos_token_id=1, bos_token_id=None)
    if s["arch"] == "gpt2":
        config = GPT2Config(vocab_size=s["vocab"], n_embd=s["n_embd"], n_layer=s["n_layer"],
                            n_head=s["n_head"], n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, tie_word_embeddings=True, **ids)
    else:
        config = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["n_embd"],
                             intermediate_size=s.get("ffn", 4 * s["n_embd"]),
                             num_hidden_layers=s["n_layer"], num_attention_heads=s["n_head"],
                             num_key_value_heads=s.get("kv_head", s["n_head"]),
                             max_position_embeddings=1024, tie_word_embeddings=True, **ids)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(**ids)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    word_tokenizer(s["vocab"]).save_pretrained(folder)
    (folder / "done").write_text("ok")


def _single_token_words(tokenizer, limit: int = 4000) -> list[str]:
    """Words that encode to exactly one token after a space (SmolLM2's vocabulary)."""
    words = []
    for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        word = token[1:]
        if token.startswith("\u0120") and word.isascii() and word.isalpha() and 3 <= len(word) <= 9:
            if len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1:
                words.append(word)
        if len(words) >= limit:
            break
    return words


def data_path(case: Case, rows_needed: int, work: Workload = DEFAULT_WORKLOAD) -> Path:
    """JSONL of at least `rows_needed` rows for `case` (its tokenizer decides the words) whose
    lengths follow `work`."""
    key = "smollm2" if case.source == "default" else f"vocab{case.shape['vocab']}"
    if work.max_length != DEFAULT_WORKLOAD.max_length:
        key += f"-len{work.max_length}"
    path = cache_dir() / "data" / f"{key}-{rows_needed}.jsonl"
    if path.is_file():
        return path
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path(case))
    if case.source == "default":
        words, lead = [" " + w for w in _single_token_words(tokenizer)], tokenizer.bos_token or ""
    else:
        words, lead = [f" w{i}" for i in range(2, len(tokenizer))], ""
    rng = random.Random(1234)

    def text(lo_hi: tuple[int, int]) -> str:
        return "".join(rng.choice(words) for _ in range(rng.randint(*lo_hi)))

    rows = []
    for _ in range(rows_needed):
        prompt = lead + text(work.prompt_tokens)
        rows.append({"prompt": prompt.lstrip(" "), "chosen": text(work.response_tokens),
                     "rejected": text(work.response_tokens)})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return path


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
