"""Shared-prompt packing: one row per example, the prompt computed once for all its responses.

The padded layout (`softpo.collate`) spends one row per response, `[prompt, response_j, pad]`, so a
pair runs its prompt through the model twice. Packed, example b is one row

    [prompt (P tokens) | response_0 (L_0) | response_1 (L_1) | ... | pad]
    positions  0..P-1  |  P..P+L_0-1      |  P..P+L_1-1      | ...

with a 4-D attention mask: a prompt token sees the earlier prompt tokens; a token of response j sees
the whole prompt and the earlier tokens of response j, nothing of the other responses; so every
response token gets exactly the hidden state it gets in its own row, and the log-probs are the same
(up to float summation order). Response j's first token is predicted by the state of the *last prompt
token* (position P-1), the others by the state just before them.

Cost: a pair of P-token prompt and L-token responses runs P + 2L tokens instead of 2P + 2L through the
layers (a quarter less when P = L). Attention is over longer rows, which costs more only when the
prompt is long compared with the responses and the model is wide enough for the t^2 term to matter.

Needs an attention implementation that takes a custom 4-D mask (transformers' `sdpa`: boolean,
`eager`: additive float); flash-attention kernels take no such mask (they would need per-response
varlen segments sharing a prefix, which they do not express), so packing refuses them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MASK_STYLES = {"sdpa": "bool", "eager": "additive"}


@dataclass
class PackedRows:
    """B packed rows holding R = B * n responses; the scored tokens listed one by one (N of them)."""

    input_ids: Tensor  # (B, T)
    attention_mask: Tensor  # (B, 1, T, T) bool (True: may attend) or additive float (0 / min)
    position_ids: Tensor  # (B, T)
    rows: Tensor  # (N,) packed row of each scored token
    cols: Tensor  # (N,) its position in the packed row
    prev: Tensor  # (N,) position of the state that predicts it
    owner: Tensor  # (N,) response index b * n + j it belongs to
    num_responses: int  # R

    def to(self, device) -> "PackedRows":
        return PackedRows(*(getattr(self, f).to(device) for f in
                            ("input_ids", "attention_mask", "position_ids", "rows", "cols", "prev",
                             "owner")), self.num_responses)


def mask_style(model) -> str:
    """How a custom mask must be given to `model`, or a ValueError naming what is unsupported."""
    from softpo.logprobs import hf_model

    impl = getattr(hf_model(model).config, "_attn_implementation", None) or "eager"
    if impl not in MASK_STYLES:
        raise ValueError(f"model.packing=shared_prompt needs attn_implementation sdpa or eager "
                         f"(a custom 4-D attention mask); this model uses '{impl}'")
    return MASK_STYLES[impl]


def packable_style(model) -> str:
    """`mask_style(model)` when packed rows can be scored: the attention takes a 4-D mask and the
    logits are a plain linear layer of the states. Otherwise a ValueError naming what is missing."""
    from softpo.logprobs import has_plain_head

    style = mask_style(model)
    if not has_plain_head(model):
        raise ValueError("shared_prompt needs a plain linear output layer; this model scales or "
                         "caps its logits")
    return style


def pack_shared_prompt(input_ids: Tensor, response_mask: Tensor, response_valid: Tensor,
                       pad_token_id: int, style: str = "bool") -> PackedRows:
    """Padded rows (B*n, T0) of `[prompt, response_j]` -> packed rows (B, T).

    `response_mask` marks the response tokens of each padded row; the prompt of example b is read
    from its first row (every row of an example starts with the same prompt).
    """
    B, n = response_valid.shape
    ids, resp = input_ids.cpu(), response_mask.cpu()
    seqs, segs, poss = [], [], []
    rows, cols, prev, owner = [], [], [], []
    for b in range(B):
        first = resp[b * n].nonzero()
        P = int(first[0]) if len(first) else int((ids[b * n] != pad_token_id).sum())
        seq, seg, pos = ids[b * n, :P].tolist(), [0] * P, list(range(P))
        for j in range(n):
            r = b * n + j
            tokens = ids[r][resp[r]].tolist() if bool(response_valid[b, j]) else []
            start = len(seq)
            for k, token in enumerate(tokens):
                rows.append(b)
                cols.append(start + k)
                prev.append(P - 1 if k == 0 else start + k - 1)
                owner.append(r)
            seq += tokens
            seg += [j + 1] * len(tokens)
            pos += range(P, P + len(tokens))
        seqs.append(seq)
        segs.append(seg)
        poss.append(pos)
    T = max(len(s) for s in seqs)
    packed = torch.full((B, T), pad_token_id, dtype=ids.dtype)
    segment = torch.full((B, T), -1, dtype=torch.long)  # -1: padding
    position = torch.zeros((B, T), dtype=torch.long)
    for b, (s, g, p) in enumerate(zip(seqs, segs, poss)):
        packed[b, :len(s)] = torch.tensor(s, dtype=ids.dtype)
        segment[b, :len(g)] = torch.tensor(g)
        position[b, :len(p)] = torch.tensor(p)
    device = input_ids.device
    long = dict(dtype=torch.long, device=device)
    return PackedRows(packed.to(device), attention_mask(segment, style).to(device),
                      position.to(device), torch.tensor(rows, **long), torch.tensor(cols, **long),
                      torch.tensor(prev, **long), torch.tensor(owner, **long), B * n)


def attention_mask(segment: Tensor, style: str) -> Tensor:
    """(B, T) segment ids (0 prompt, j+1 response j, -1 pad) -> (B, 1, T, T) mask.

    allowed[q, k] = k <= q and k is not padding and (k is prompt or k, q in the same response);
    a padding query sees itself only (no all-masked row, hence no NaN; its output is never used).
    """
    T = segment.shape[1]
    q = torch.arange(T)
    causal = q[None, :, None] >= q[None, None, :]  # (1, T, T)
    key, query = segment[:, None, :], segment[:, :, None]  # (B, 1, T), (B, T, 1)
    allowed = causal & (key >= 0) & (query >= 0) & ((key == 0) | (key == query))
    allowed |= torch.eye(T, dtype=torch.bool)[None]
    allowed = allowed[:, None]  # (B, 1, T, T)
    if style == "bool":
        return allowed
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
