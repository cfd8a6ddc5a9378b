"""One prompt encoder (softpo/collate.py, `encode_prompt`): a prompt becomes the same tokens on every
path that reads it, so a response is trained after exactly the tokens it was sampled after.

Paths: the training rows (`tokenize_example`, and the Trainer's tokenised train set); the global KL
regulariser's samples (`Trainer.refresh_samples`); `build_preferences` (`softpo build-prefs`);
`evaluate_samples` (the demo's evaluation); the `softpo sample` command; the teacher-forced
`success_probability` of the arithmetic task. The sampling paths are observed where the tokens
enter the model: every call of `generate()` is recorded.

The tokenizer adds BOS itself and its chat template writes BOS too (so the special-token rules
matter), and `max_prompt_length` = 24 cuts two of the four prompts: the 31-token string and the
system + user conversation keep their last 24 tokens.
"""

from __future__ import annotations

import json

import pytest
import torch

from softpo import cli, models
from softpo.collate import encode_prompt, prompt_batch, tokenize_example
from softpo.config import Config, DataConfig, TinyModelConfig
from softpo.data import to_example
from softpo.evaluation import evaluate_samples
from softpo.models import build_tiny_model
from softpo.prefs import build_preferences
from softpo.trainer import Trainer

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PROMPTS = ["a short one", "x" * 30, [{"role": "user", "content": "hi"}],
           [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 2+2?"}]]
CFG = DataConfig(max_length=64, max_prompt_length=24)


def make_tokenizer():
    """One token per byte (id 5 + position in the ByteLevel alphabet), specials <|pad|>=0
    <|bos|>=1 <|eos|>=2 <|im_start|>=3 <|im_end|>=4, BOS prepended by the post-processor."""
    from tokenizers import Tokenizer, decoders, models as tmodels, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
    vocab = {s: i for i, s in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(tmodels.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A",
                                                       special_tokens=[("<|bos|>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>",
                                   eos_token="<|im_end|>", chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def spy_model(tokenizer):
    """A tiny model whose `generate()` records the prompts it is given (padding removed, once per
    prompt however many samples are drawn)."""
    model = build_tiny_model(TinyModelConfig(n_layer=1, n_embd=32, n_head=2, n_positions=128),
                             tokenizer, seed=0)
    model.seen = []
    generate = model.generate

    def recording(*args, input_ids, attention_mask, **kwargs):
        for ids, mask in zip(input_ids, attention_mask):
            prompt = ids[mask.bool()].tolist()
            if prompt not in model.seen:
                model.seen.append(prompt)
        return generate(*args, input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    model.generate = recording
    return model


def expected(tokenizer) -> list[list[int]]:
    """The training rows' prompt tokens, one list per prompt of PROMPTS."""
    rows = [to_example({"prompt": p, "chosen": "yes", "rejected": "no"}, "rows", i + 1)
            for i, p in enumerate(PROMPTS)]
    return [tokenize_example(row, tokenizer, CFG).prompt_ids for row in rows]


def test_the_encoder_renders_encodes_and_keeps_the_last_tokens(tok):
    """By hand: a plain string gets the tokenizer's BOS; a conversation is its template text,
    whose BOS the template wrote (none added); the long ones keep their last 24 tokens."""
    def raw(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    want = [[1] + raw("a short one"), raw("x" * 30)[-24:],
            raw(tok.apply_chat_template(PROMPTS[2], tokenize=False, add_generation_prompt=True)),
            raw(tok.apply_chat_template(PROMPTS[3], tokenize=False,
                                        add_generation_prompt=True))[-24:]]
    assert want[2][:2] == [1, 3] and len(want[2]) == 22  # <|bos|><|im_start|>user\nhi...
    assert [encode_prompt(p, tok, CFG) for p in PROMPTS] == want == expected(tok)
    ids, mask = prompt_batch(PROMPTS, tok, CFG)  # (4, 24) left-padded
    assert [row[m.bool()].tolist() for row, m in zip(ids, mask)] == want


def test_training_and_regulariser_see_the_same_tokens(tok, tmp_path):
    rows = [{"prompt": p, "chosen": "yes", "rejected": "no"} for p in PROMPTS]
    cfg = Config()
    cfg.data.max_length, cfg.data.max_prompt_length = CFG.max_length, CFG.max_prompt_length
    cfg.model.tiny.n_positions = 128
    cfg.loss.beta = 0.1  # SPO with the global KL: the regulariser samples
    cfg.regularizer.prompts_per_step, cfg.regularizer.max_new_tokens = len(PROMPTS), 2
    cfg.train.output_dir, cfg.train.report_to, cfg.train.progress = str(tmp_path), [], False
    model = spy_model(tok)
    t = Trainer(cfg, model=model, tokenizer=tok, train_dataset=rows)
    assert [e.prompt_ids for e in t.train_set] == expected(tok)
    t.refresh_samples(0)
    assert sorted(model.seen) == sorted(expected(tok))


def test_build_prefs_and_evaluation_sample_after_the_training_tokens(tok):
    model = spy_model(tok)
    build_preferences(model, tok, PROMPTS, lambda prompts, responses: [0.0] * len(responses),
                      n=2, max_new_tokens=2, seed=0, progress=False, data_cfg=CFG)
    assert model.seen == expected(tok)
    model.seen.clear()
    evaluate_samples(model, tok, PROMPTS, CFG, None, k=2, max_new_tokens=2, seed=0)
    assert model.seen == expected(tok)


def test_the_sample_command_samples_after_the_training_tokens(tok, tmp_path, monkeypatch, capsys):
    model = spy_model(tok)
    monkeypatch.setattr(models, "load_tokenizer", lambda cfg: tok)
    monkeypatch.setattr(models, "load_model", lambda cfg, tokenizer, seed: model)
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    assert cli.main(["sample", "any", "--prompts", str(path), "--max-new-tokens", "2",
                     "--max-prompt-length", "24"]) == 0
    assert model.seen == expected(tok)
    assert len(capsys.readouterr().out.splitlines()) == 2 * len(PROMPTS)


def test_success_probability_scores_after_the_training_tokens(tok, monkeypatch):
    """The teacher-forced evaluation's rows start with the encoder's prompt tokens."""
    from softpo import logprobs
    from softpo.tasks import arithmetic

    seen = []

    def recording(model, input_ids, attention_mask, response_mask, *args, **kwargs):
        for ids, response in zip(input_ids, response_mask):
            prompt = ids[:int(response.nonzero()[0])].tolist()
            if prompt not in seen:
                seen.append(prompt)
        return torch.zeros(input_ids.shape[0])

    monkeypatch.setattr(logprobs, "sequence_logps", recording)
    monkeypatch.setattr(arithmetic, "answer_for", lambda prompt: 4)
    arithmetic.success_probability(spy_model(tok), tok, PROMPTS, data_cfg=CFG)
    assert seen == expected(tok)
