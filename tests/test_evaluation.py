"""softpo/evaluation.py and `softpo eval`: distinct-n, preference accuracy (hand-worked), and the
command on a saved tiny model against an independent full-forward oracle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from softpo import cli, evaluation
from softpo.collate import PreferenceBatch
from softpo.evaluation import distinct_n, preference_accuracy

ROOT = Path(__file__).resolve().parents[1]


def test_distinct_n_hand_values():
    """"a b a b" and "a b c": unigrams a b a b a b c, 3 distinct of 7; bigrams ab ba ab | ab bc,
    3 distinct (ab, ba, bc) of 5; a text shorter than n has no n-grams; none at all gives 0."""
    texts = ["a b a b", "a b c"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)
    assert distinct_n(["a", "b c"], 2) == 1.0
    assert distinct_n(["", "a"], 2) == 0.0


def _batch(valid: list[list[bool]]) -> PreferenceBatch:
    """A batch whose token tensors are placeholders: the log-probs come from the stubs below."""
    B, n = len(valid), len(valid[0])
    ids = torch.zeros(B * n, 2, dtype=torch.long)
    return PreferenceBatch(ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool),
                           torch.tensor(valid), torch.ones(B, n, dtype=torch.long))


def test_preference_accuracy_hand_values(monkeypatch):
    """Three examples, summed policy log-probs (best first) and reference log-probs:
        ex 1: policy (-1, -3)       ref (-2, -1)   policy margin  2, ratio (1, -2): best wins
        ex 2: policy (-4, -2, -9)   ref (-1, -5, -9)  margin -2 (-4 vs max(-2, -9)); ratio (-3, 3, 0)
        ex 3: policy (-5, -1, pad)  ref (-9, -2, -) margin -4; ratio (4, 1): best wins
    accuracy 1/3, margin (2 - 2 - 4) / 3 = -4/3, implicit-reward accuracy 2/3. The padding
    response of ex 3 (valid False) is never the best, whatever its log-prob."""
    policy = torch.tensor([-1.0, -3, 0, -4, -2, -9, -5, -1, 100])  # (R,) = (3 x 3), row-major
    ref = torch.tensor([-2.0, -1, 0, -1, -5, -9, -9, -2, 0])
    batch = _batch([[True, True, False], [True, True, True], [True, True, False]])
    monkeypatch.setattr(evaluation, "token_logps",
                        lambda model, ids, attn, resp: policy[:, None].expand(-1, 2) / 2)

    class Reference:
        def sequence_logps(self, rows):
            return ref

    out = preference_accuracy(None, [batch], Reference())
    assert out["examples"] == 3
    assert out["accuracy"] == pytest.approx(1 / 3)
    assert out["margin"] == pytest.approx(-4 / 3)
    assert out["implicit_reward_accuracy"] == pytest.approx(2 / 3)
    assert "implicit_reward_accuracy" not in preference_accuracy(None, [batch])


def test_the_eval_command_against_a_full_forward_oracle(tmp_path, capsys):
    """`softpo eval` on a saved tiny model: accuracy and margin equal those from the plain HF
    forward (log-softmax over the full vocabulary) on the same tokenised rows; with the model as
    its own reference every log-ratio is 0, so no best response has the highest ratio."""
    from softpo.collate import collate, tokenize_examples
    from softpo.config import DataConfig, TinyModelConfig
    from softpo.data import load_preferences
    from softpo.models import build_tiny_model, byte_tokenizer, save_pretrained_atomic

    tok = byte_tokenizer()
    model = build_tiny_model(TinyModelConfig(n_layer=1, n_embd=32, n_head=2), tok, seed=3).eval()
    save_pretrained_atomic(model, tok, tmp_path / "model")
    data = ROOT / "examples" / "data" / "pairs.jsonl"
    assert cli.main(["eval", str(tmp_path / "model"), "--data", str(data), "--ref",
                     str(tmp_path / "model"), "--max-length", "128", "--max-prompt-length", "64",
                     "--json"]) == 0
    got = json.loads(capsys.readouterr().out)

    cfg = DataConfig(max_length=128, max_prompt_length=64)
    examples, report = load_preferences(str(data), cfg)
    batch = collate(tokenize_examples(examples, tok, cfg, report), tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logps = logits[:, :-1].float().log_softmax(-1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    summed = (logps * batch.response_mask[:, 1:]).sum(-1).view(-1, 2)  # (B, 2) chosen, rejected
    margins = summed[:, 0] - summed[:, 1]
    assert got["examples"] == len(examples) == summed.shape[0]
    assert got["accuracy"] == pytest.approx(float((margins > 0).float().mean()))
    assert got["margin"] == pytest.approx(float(margins.mean()), rel=1e-4, abs=1e-4)
    assert got["implicit_reward_accuracy"] == 0.0


def test_the_eval_command_rejects_bad_lengths(capsys):
    assert cli.main(["eval", "tiny", "--data", "x.jsonl", "--max-length", "8",
                     "--max-prompt-length", "8"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
