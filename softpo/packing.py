"""The layouts a forward pass runs: padded rows (`Rows`) and packed rows (`PackedRows`):
shared-prompt units (the prompt computed once for all its responses) and padding-free units
(`[prompt, response]` without its padding), several units per row (`pack`).

The padded layout (`softpo.collate`, `Rows`) spends one row per response, `[prompt, response_j, pad]`, so a
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

from softpo.models import has_plain_head, hf_model

MASK_STYLES = {"sdpa": "bool", "eager": "additive"}


@dataclass
class Rows:
    """Right-padded token rows `[prompt, response, pad]` whose response tokens are scored."""

    input_ids: Tensor  # (R, T)
    attention_mask: Tensor  # (R, T)
    response_mask: Tensor  # (R, T) bool, True on response tokens


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
    lengths: Tensor  # (B,) tokens before each row's padding

    def to(self, device) -> "PackedRows":
        """The rows with every tensor on `device`."""
        return PackedRows(*(getattr(self, f).to(device) for f in
                            ("input_ids", "attention_mask", "position_ids", "rows", "cols", "prev",
                             "owner")), self.num_responses, self.lengths.to(device))


def mask_style(model) -> str:
    """How a custom mask must be given to `model`, or a ValueError naming what is unsupported."""
    impl = getattr(hf_model(model).config, "_attn_implementation", None) or "eager"
    if impl not in MASK_STYLES:
        raise ValueError(f"model.packing=shared_prompt needs attn_implementation sdpa or eager "
                         f"(a custom 4-D attention mask); this model uses '{impl}'")
    return MASK_STYLES[impl]


def packable_style(model) -> str:
    """`mask_style(model)` when packed rows can be scored: the attention takes a 4-D mask and the
    logits are a plain linear layer of the states. Otherwise a ValueError naming what is missing."""
    style = mask_style(model)
    if not has_plain_head(model):
        raise ValueError("shared_prompt needs a plain linear output layer; this model scales or "
                         "caps its logits")
    return style


@dataclass
class _Unit:
    """Tokens that stay together in one packed row: a prompt and the responses that attend to it."""

    tokens: list[int]
    segment: list[int]  # 0 prompt, j+1 response j
    position: list[int]
    scored: list[tuple[int, int, int]]  # (column, column of the predicting state, response index)


def _units(input_ids: Tensor, response_mask: Tensor, response_valid: Tensor, pad_token_id: int,
           share_prompt: bool) -> list[_Unit]:
    """One unit per example ([prompt, response_1, ..., response_n]) or, without `share_prompt`, one
    per response ([prompt, response_j], the padded row without its padding)."""
    B, n = response_valid.shape
    ids, resp = input_ids.cpu(), response_mask.cpu()
    units = []
    for b in range(B):
        first = resp[b * n].nonzero()
        P = int(first[0]) if len(first) else int((ids[b * n] != pad_token_id).sum())
        prompt = ids[b * n, :P].tolist()
        unit = None
        for j in range(n):
            r = b * n + j
            if unit is None or not share_prompt:
                unit = _Unit(list(prompt), [0] * P, list(range(P)), [])
                units.append(unit)
            tokens = ids[r][resp[r]].tolist() if bool(response_valid[b, j]) else []
            start = len(unit.tokens)
            unit.scored += [(start + k, P - 1 if k == 0 else start + k - 1, r)
                            for k in range(len(tokens))]
            unit.tokens += tokens
            unit.segment += [j + 1] * len(tokens)
            unit.position += range(P, P + len(tokens))
    return units


def _bins(lengths: list[int], capacity: int | None) -> list[list[int]]:
    """Unit indices per row: first-fit decreasing into rows of `capacity` tokens (at least the
    longest unit); None: one unit per row, in order."""
    if capacity is None:
        return [[i] for i in range(len(lengths))]
    capacity = max(capacity, max(lengths, default=0))
    rows, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        k = next((k for k, f in enumerate(free) if f >= lengths[i]), None)
        if k is None:
            rows.append([])
            free.append(capacity)
            k = len(rows) - 1
        rows[k].append(i)
        free[k] -= lengths[i]
    return rows


def pack(input_ids: Tensor, response_mask: Tensor, response_valid: Tensor, pad_token_id: int,
         style: str = "bool", share_prompt: bool = True, row_tokens: int | None = None
         ) -> PackedRows:
    """Padded rows (B*n, T0) of `[prompt, response_j]` -> packed rows (rows, T).

    `response_mask` marks the response tokens of each padded row; the prompt of example b is read
    from its first row (every row of an example starts with the same prompt). `share_prompt`: one
    unit per example, the prompt once; otherwise one unit per response (padding-free rows).
    `row_tokens`: pack several units into rows of that many tokens (never splitting a unit; a
    longer unit gets a row of its own); None: one unit per row.
    """
    units = _units(input_ids, response_mask, response_valid, pad_token_id, share_prompt)
    bins = _bins([len(u.tokens) for u in units], row_tokens)
    T = max((sum(len(units[i].tokens) for i in row) for row in bins), default=1)
    packed = torch.full((len(bins), T), pad_token_id, dtype=input_ids.dtype)
    unit_id = torch.full((len(bins), T), -1, dtype=torch.long)  # -1: padding
    segment = torch.zeros((len(bins), T), dtype=torch.long)
    position = torch.zeros((len(bins), T), dtype=torch.long)
    rows, cols, prev, owner = [], [], [], []
    for b, row in enumerate(bins):
        at = 0
        for i in row:
            u, end = units[i], at + len(units[i].tokens)
            packed[b, at:end] = torch.tensor(u.tokens, dtype=input_ids.dtype)
            unit_id[b, at:end] = i
            segment[b, at:end] = torch.tensor(u.segment)
            position[b, at:end] = torch.tensor(u.position)
            for col, pred, r in u.scored:
                rows.append(b)
                cols.append(at + col)
                prev.append(at + pred)
                owner.append(r)
            at = end
    order = sorted(range(len(owner)), key=lambda k: (owner[k], cols[k]))  # response by response
    pick = lambda xs: torch.tensor([xs[k] for k in order], dtype=torch.long,  # noqa: E731
                                   device=input_ids.device)
    device = input_ids.device  # the (B, 1, T, T) mask is built there: no CPU work, no copy
    unit_id, segment = unit_id.to(device), segment.to(device)
    return PackedRows(packed.to(device), attention_mask(unit_id, segment, style),
                      position.to(device), pick(rows), pick(cols), pick(prev), pick(owner),
                      response_valid.numel(), (unit_id >= 0).sum(1))


def attention_mask(unit: Tensor, segment: Tensor, style: str) -> Tensor:
    """(B, T) unit ids (-1 pad) and segment ids (0 prompt, j+1 response j) -> (B, 1, T, T) mask,
    on their device.

    allowed[q, k] = k <= q, k and q in the same unit, and k is prompt or in q's response; a padding
    query sees itself only (no all-masked row, hence no NaN; its output is never used).
    """
    T, device = segment.shape[1], segment.device
    q = torch.arange(T, device=device)
    causal = q[None, :, None] >= q[None, None, :]  # (1, T, T)
    same_unit = (unit[:, None, :] == unit[:, :, None]) & (unit[:, None, :] >= 0)  # (B, T, T)
    key, query = segment[:, None, :], segment[:, :, None]  # (B, 1, T), (B, T, 1)
    allowed = causal & same_unit & ((key == 0) | (key == query))
    allowed |= torch.eye(T, dtype=torch.bool, device=device)[None]
    allowed = allowed[:, None]  # (B, 1, T, T)
    if style == "bool":
        return allowed
    return torch.zeros(allowed.shape, device=device).masked_fill(~allowed,
                                                                 torch.finfo(torch.float32).min)


def share_prompts(rows: Rows, style: str, hidden_size: int) -> PackedRows | None:
    """Rows whose consecutive runs repeat one prompt (k samples per prompt, as sampling returns
    them), packed with the prompt once per run (`pack`, shared prompt); None when the runs are not
    all of one size, a row has an empty prompt or response, or sharing would not pay.

    Pays: the estimated cost of a layout, `6 * hidden_size * tokens + attention pairs` (linear
    layers about 24 d^2 per token, attention 4 d per query-key pair, both over 4 d), is lower
    packed: the prompt runs once, but each packed row attends over all its responses.
    """
    resp = rows.response_mask.cpu()
    starts = resp.long().argmax(1)  # (S,) each row's prompt length
    lengths = resp.sum(1)  # (S,)
    if not bool((starts > 0).all() and (lengths > 0).all()):
        return None
    ids = rows.input_ids.cpu()
    prompts = [tuple(ids[r, :int(starts[r])].tolist()) for r in range(len(ids))]
    runs = []  # lengths of the runs of equal consecutive prompts
    for r, prompt in enumerate(prompts):
        if r and prompt == prompts[r - 1]:
            runs[-1] += 1
        else:
            runs.append(1)
    n = runs[0]
    if n < 2 or any(r != n for r in runs):
        return None
    total = (starts + lengths).tolist()  # (S,) tokens per padded row
    units = [int(starts[b * n]) + int(lengths[b * n:(b + 1) * n].sum()) for b in range(len(runs))]
    padded = 6 * hidden_size * sum(total) + sum(t * t for t in total)
    shared = 6 * hidden_size * sum(units) + sum(u * u for u in units)
    if shared >= padded:
        return None
    valid = torch.ones(len(runs), n, dtype=torch.bool)
    return pack(rows.input_ids, rows.response_mask, valid, 0, style)
