"""Packed layouts (softpo/packing.py): shared-prompt and padding-free rows by hand, and the same
losses and gradients as the padded layout through the whole trainer, for both tiny architectures,
both mask styles and both packed layouts."""

from pathlib import Path

import pytest
import torch

from softpo.build import packing_style
from softpo.collate import TokenizedExample, collate
from softpo.config import load_config
from softpo.errors import UserError
from softpo.packing import _bins, mask_style, pack
from softpo.trainer import StepStats, Trainer

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data" / "prefs_tiny.jsonl"


def hand_batch():
    """Example 0: prompt [5, 6, 7], responses [8, 9, 10] and [11, 12]; example 1: prompt [5],
    responses [13, 14] and [15, 16, 17, 18]."""
    a = TokenizedExample([5, 6, 7], [[8, 9, 10], [11, 12]], "pairs", "hand", 1, "p1")
    b = TokenizedExample([5], [[13, 14], [15, 16, 17, 18]], "pairs", "hand", 2, "p2")
    return collate([a, b], pad_token_id=0)


def test_layout_by_hand():
    """Row 0 = [5 6 7 | 8 9 10 | 11 12] at positions [0 1 2 | 3 4 5 | 3 4]; row 1 = [5 | 13 14 |
    15 16 17 18 | pad pad] at [0 | 1 2 | 1 2 3 4 | 0 0]. Response 1's first token (11 at column 6)
    is predicted from the last prompt token (column 2), not from column 5."""
    batch = hand_batch()
    p = pack(batch.input_ids, batch.response_mask, batch.response_valid, 0)
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12], [5, 13, 14, 15, 16, 17, 18, 0]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 3, 4], [0, 1, 2, 1, 2, 3, 4, 0]]
    assert p.cols.tolist() == [3, 4, 5, 6, 7, 1, 2, 3, 4, 5, 6]
    assert p.prev.tolist() == [2, 3, 4, 2, 6, 0, 1, 0, 3, 4, 5]
    assert p.owner.tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 3]
    m = p.attention_mask[0, 0].int()  # (T, T) example 0
    assert m[6].tolist() == [1, 1, 1, 0, 0, 0, 1, 0]  # 11 sees the prompt and itself, not 8 9 10
    assert m[5].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]  # 10 sees the prompt, 8, 9 and itself
    assert p.attention_mask[1, 0, 7].int().tolist() == [0] * 7 + [1]  # padding sees itself only


def test_padding_free_rows_by_hand():
    """Without a shared prompt each response is its own [prompt, response] unit: lengths 6, 5, 3
    and 5. Rows of 10 tokens, first-fit decreasing: [6-unit | 3-unit], [5 | 5]; a unit sees only
    itself (causally), never its row neighbour."""
    batch = hand_batch()
    p = pack(batch.input_ids, batch.response_mask, batch.response_valid, 0, share_prompt=False,
             row_tokens=10)
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 5, 13, 14, 0],
                                    [5, 6, 7, 11, 12, 5, 15, 16, 17, 18]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 0], [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]]
    assert p.lengths.tolist() == [9, 10]
    assert p.owner.tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 3]  # response by response
    assert p.rows.tolist() == [0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1]
    assert p.cols.tolist() == [3, 4, 5, 3, 4, 7, 8, 6, 7, 8, 9]
    assert p.prev.tolist() == [2, 3, 4, 2, 3, 6, 7, 5, 6, 7, 8]
    m = p.attention_mask[1, 0].int()
    assert m[5].tolist() == [0] * 5 + [1] + [0] * 4  # the second unit's first token: itself only
    assert m[9].tolist() == [0] * 5 + [1] * 5
    assert m[4].tolist() == [1] * 5 + [0] * 5


def test_bins_first_fit_decreasing():
    assert _bins([6, 5, 3, 5], 10) == [[0, 2], [1, 3]]
    assert _bins([6, 5, 3, 5], None) == [[0], [1], [2], [3]]
    assert _bins([12, 3], 10) == [[0], [1]]  # a unit longer than a row gets a row of its own


def make_trainer(tmp_path, **extra) -> Trainer:
    base = {"data.train": DATA, "data.max_length": 64, "data.max_prompt_length": 32,
            "model.tiny.n_layer": 2, "model.tiny.n_embd": 32, "model.tiny.n_head": 2,
            "train.output_dir": tmp_path / "run", "train.batch_size": 4, "train.progress": False,
            "train.report_to": "[]", **extra}
    return Trainer(load_config(None, [f"{k}={v}" for k, v in base.items()]))


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("gpt2", "eager")])
@pytest.mark.parametrize("loss", ["spo", "dpo"])
@pytest.mark.parametrize("packing,pack_tokens", [("shared_prompt", 0), ("padding_free", 0),
                                                 ("padding_free", 30)])
def test_packed_equals_padded_through_the_trainer(tmp_path, arch, attn, loss, packing, pack_tokens):
    """Same loss and same gradient as the padded layout, policy and (for dpo) reference."""
    extra = {"model.tiny.architecture": arch, "model.attn_implementation": attn, "loss.name": loss,
             "loss.beta": 0.0 if loss == "spo" else 0.5, "model.packing": packing,
             "model.pack_tokens": pack_tokens}
    t = make_trainer(tmp_path, **extra)
    with torch.no_grad():  # move the policy away from the reference so that ratios are not zero
        for p in t.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = t.collate(t.train_set[:4])
    model = t.acc.unwrap_model(t.scorer).model
    results = []
    if pack_tokens == 0:  # rows really packed (30 tokens: some units are longer than a row)
        assert t.rows(batch).input_ids.shape[0] < batch.input_ids.shape[0]
    for style in (None, mask_style(model)):
        t.pack_style = style
        loss_value = t.forward_loss(batch, False, StepStats(), scale=0.25)
        grads = torch.autograd.grad(loss_value, [p for p in model.parameters()])
        results.append((loss_value.detach(), grads))
    (padded, g_padded), (packed, g_packed) = results
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_packed, g_padded):  # float32 summation order differs: slack relative to scale
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
    assert any(float(g.abs().sum()) > 0 for g in g_padded)


def test_unsupported_attention_is_a_user_error(tmp_path):
    t = make_trainer(tmp_path, **{"loss.beta": 0.0})
    t.policy.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="sdpa or eager"):
        mask_style(t.policy)
    t.cfg.model.packing = "shared_prompt"
    with pytest.raises(UserError, match="model.packing"):
        packing_style(t.cfg, t.policy)


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("gpt2", "eager")])
def test_packed_sample_scoring_equals_padded(arch, attn):
    """`softpo.evaluation.score_samples`: k samples per prompt scored in one packed row give the
    padded rows' log-probs, for the policy and for the reference."""
    from tiny_samples import perturbed_samples

    from softpo.evaluation import _packed_samples, score_samples
    from softpo.logprobs import Reference

    model, ref, tok, batch = perturbed_samples(arch, attn, ["ab", "hello there"], 3, 6, seed=1)
    reference = Reference(ref, adapter_toggle=False)
    assert _packed_samples(model, batch, tok.pad_token_id) is not None  # the packed path runs
    with torch.no_grad():
        padded = score_samples(model, reference, batch)
        packed = score_samples(model, reference, batch, tok.pad_token_id)
    for a, b in zip(padded, packed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(padded[0], padded[1])  # policy and reference really differ


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("gpt2", "eager")])
def test_packed_rows_in_length_groups_equal_one_block(monkeypatch, arch, attn):
    """Packed rows of 6, 5, 3 and 5 tokens run in length groups (4-D mask sliced on both axes) give
    the log-probs of one block."""
    from softpo import logprobs
    from softpo.config import TinyModelConfig
    from softpo.models import build_tiny_model, byte_tokenizer

    tok = byte_tokenizer()
    model = build_tiny_model(TinyModelConfig(architecture=arch, n_layer=2, n_embd=32, n_head=2),
                             tok, seed=0, attn_implementation=attn)
    batch = hand_batch()
    p = pack(batch.input_ids, batch.response_mask, batch.response_valid, 0, mask_style(model),
             share_prompt=False)
    assert len(logprobs.length_groups(p.lengths.tolist(), 4)) > 1
    out = []
    for buckets in (4, 1):
        monkeypatch.setattr(logprobs, "LENGTH_BUCKETS", buckets)
        with torch.no_grad():
            out.append(logprobs.score_tokens(model, p, 1024).sum(-1))
    torch.testing.assert_close(out[0], out[1], rtol=1e-5, atol=1e-5)


def _sample_rows(prompts: list[list[int]], responses: list[list[int]], k: int):
    """Right-padded rows [prompt, response, pad] for k responses per prompt (prompt-major)."""
    from softpo.packing import Rows

    seqs = [(p, r) for i, p in enumerate(prompts) for r in responses[i * k:(i + 1) * k]]
    T = max(len(p) + len(r) for p, r in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    resp = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, (p, r) in enumerate(seqs):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        resp[i, len(p):len(p) + len(r)] = True
    return Rows(ids, (ids != 0).long(), resp)


def test_share_prompts_packs_each_run_of_one_prompt_once():
    """Prompts [5 6 7 8] and [9 10 11], two samples each: one packed row per prompt, [5 6 7 8 |
    1 2 | 3 | pad] and [9 10 11 | 4 12 | 13 14 15]; the scored tokens in the padded rows' order
    (sample by sample), each sample's first token predicted by its prompt's last token."""
    from softpo.packing import share_prompts

    rows = _sample_rows([[5, 6, 7, 8], [9, 10, 11]], [[1, 2], [3], [4, 12], [13, 14, 15]], 2)
    p = share_prompts(rows, "bool", hidden_size=64)
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 1, 2, 3, 0], [9, 10, 11, 4, 12, 13, 14, 15]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 4, 0], [0, 1, 2, 3, 4, 3, 4, 5]]
    assert p.owner.tolist() == [0, 0, 1, 2, 2, 3, 3, 3]
    assert p.rows.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert p.cols.tolist() == [4, 5, 6, 3, 4, 5, 6, 7]
    assert p.prev.tolist() == [3, 4, 3, 2, 3, 2, 5, 6]


def test_share_prompts_declines_what_it_cannot_or_need_not_share():
    """None (the padded rows run instead) when no prompt repeats, the runs differ in size, a row
    has no sampled token, or the packed rows' attention would cost more than the prompt saves."""
    from softpo.packing import share_prompts

    prompts, responses = [[5, 6, 7], [9, 10]], [[1], [2], [3], [4]]
    assert share_prompts(_sample_rows(prompts, responses, 2), "bool", 64) is not None
    once = _sample_rows([[5, 6, 7], [9, 10], [5, 6], [9]], responses, 1)
    assert share_prompts(once, "bool", 64) is None
    uneven = _sample_rows(prompts, responses, 2)
    uneven.input_ids[1, :3] = torch.tensor([5, 6, 8])  # runs of 1, 1 and 2 rows
    assert share_prompts(uneven, "bool", 64) is None
    empty = _sample_rows(prompts, responses, 2)
    empty.response_mask[3] = False
    assert share_prompts(empty, "bool", 64) is None
    long = _sample_rows([[5]], [[1] * 40, [2] * 40], 2)  # one-token prompt, 40-token samples
    assert share_prompts(long, "bool", 1) is None
    assert share_prompts(long, "bool", 1000) is not None  # wide layers: the tokens count
