"""Cached reference log-probs (softpo/refcache.py): same losses as the per-step reference forward,
persisted and reused, keyed by data and model, and the reference model freed when unused."""

from pathlib import Path

import pytest
import torch

from softpo import refcache
from softpo.config import load_config
from softpo.trainer import StepStats, Trainer

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data" / "prefs_tiny.jsonl"


def make_trainer(tmp_path, **extra) -> Trainer:
    data = tmp_path / "rows.jsonl"  # the first 40 rows: 36 train, 4 eval
    if not data.is_file():
        data.write_text("".join(DATA.read_text().splitlines(keepends=True)[:40]))
    base = {"data.train": data, "data.max_length": 64, "data.max_prompt_length": 32,
            "model.tiny.n_layer": 1, "model.tiny.n_embd": 32, "model.tiny.n_head": 2,
            "train.output_dir": tmp_path / "run", "train.batch_size": 4, "train.progress": False,
            "train.report_to": "[]", "train.eval_batch_size": 64, "loss.name": "dpo",
            "loss.beta": 0.5, "loss.ref_cache_dir": tmp_path / "cache", **extra}
    return Trainer(load_config(None, [f"{k}={v}" for k, v in base.items()]))


def losses(t: Trainer, items) -> torch.Tensor:
    return t.forward_loss(t.collate(items), False, StepStats(), scale=1.0).detach()


def test_cached_equals_reference_forward_and_is_reused(tmp_path, monkeypatch):
    live = make_trainer(tmp_path)
    cached = make_trainer(tmp_path, **{"loss.precompute_ref_logps": True})
    assert cached.reference is None  # DPO without the regulariser: the reference model is freed
    files = list((tmp_path / "cache").glob("*.safetensors"))
    assert len(files) == 1
    rows = 2 * (len(cached.train_set) + len(cached.eval_set))
    assert len(cached.ref_cache) <= rows  # identical rows share one entry
    # the same policy weights on both sides (same seed), so the losses must agree
    for items in (cached.train_set[:8], cached.eval_set[:8], cached.train_set[-3:]):
        torch.testing.assert_close(losses(cached, items), losses(live, items), rtol=1e-5, atol=1e-5)

    def no_compute(*a, **k):
        raise AssertionError("the cache file should have been read, not recomputed")

    monkeypatch.setattr(refcache, "compute", no_compute)
    again = make_trainer(tmp_path, **{"loss.precompute_ref_logps": True})
    assert again.ref_cache.table == cached.ref_cache.table


def test_key_changes_with_data_and_weights(tmp_path):
    make_trainer(tmp_path, **{"loss.precompute_ref_logps": True})
    make_trainer(tmp_path, **{"loss.precompute_ref_logps": True, "data.max_length": 48})
    make_trainer(tmp_path, **{"loss.precompute_ref_logps": True, "train.seed": 1})
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3


def test_lora_keeps_its_reference_and_a_missing_row_is_an_error(tmp_path):
    t = make_trainer(tmp_path, **{"loss.precompute_ref_logps": True, "lora.enabled": True,
                                  "lora.r": 4, "lora.target_modules": "[q_proj, v_proj]"})
    assert t.reference is not None and t.reference.adapter_toggle  # the policy itself: kept
    batch = t.collate(t.train_set[:2])
    batch.input_ids[0, 1] += 1  # a row the cache never saw
    with pytest.raises(KeyError, match="not in the reference log-prob cache"):
        t.ref_cache.lookup(batch.input_ids, batch.attention_mask, batch.response_mask)


def test_row_keys_depend_on_tokens_and_prompt_length():
    ids = torch.tensor([[5, 6, 7, 8, 0], [5, 6, 7, 8, 0], [5, 6, 7, 9, 0], [5, 6, 0, 0, 0]])
    attn = (ids != 0).long()
    resp = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 0]]).bool()
    k = refcache.row_keys(ids, attn, resp)
    assert k[3] is None  # no response tokens: a padding response
    assert len({k[0], k[1], k[2]}) == 3  # another prompt split, another token: other keys
    assert refcache.row_keys(ids[:1], attn[:1], resp[:1])[0] == k[0]  # whatever the batch
