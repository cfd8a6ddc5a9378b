"""Model outputs -> per-token and per-sequence log-probs.

Rows are right-padded `[prompt, response, pad]` sequences; `response_mask` (R, T) is True on the
response tokens (the tokens whose log-probs are summed). The token at position t is predicted by the
hidden state at position t-1, so only the hidden states *before* response tokens go through the output
layer: prompt positions never produce logits at all.

Memory: the float32 `[rows, T, vocab]` tensor is never materialised. Selected hidden states are sent
through the output layer in chunks of at most `chunk_size` positions, and of at most
`LOGIT_BUDGET // vocab` positions for large vocabularies; each chunk's logits are recomputed in
backward (`_LabelLogSoftmax`, in place), so at most one `[chunk, vocab]` block of logits is alive
at a time. The chunk's backward runs while every activation of the model is
still held, so its size adds directly to the peak memory of a step.

Padding: rows of very different lengths are not run as one (R, T) block. They are sorted by length
and split into at most `LENGTH_BUCKETS` groups, each run trimmed to its own longest row
(`length_groups` picks the split with the fewest padded positions), so a short row does not pay
for the batch's longest one. Each row's computation is unchanged (same states up to float
summation order).

The regulariser's samples (`sample_states`, `token_kl_and_logps`): k samples of one prompt share
it, so the policy and the reference run each prompt once for its samples (shared-prompt packing,
`softpo.packing.share_prompts`) where the attention takes a 4-D mask. The exact per-position KL
is one autograd function (`_TokenKL`) over blocks of logits. When all sampled positions fit one
chunk, the reference's full log-probs there are computed once per refresh and kept
(`Reference.sample_view`), and the policy's are kept from forward to backward instead of
recomputed: at most two more `LOGIT_BUDGET` blocks alive, and a step with fresh samples runs
their output-layer matmul 4 times instead of 7 (the reference once, the policy once forward and
twice in backward).
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from softpo.models import has_plain_head, hf_model
from softpo.packing import PackedRows, Rows, packable_style, share_prompts

DEFAULT_CHUNK = 1024
LOGIT_BUDGET = 1 << 26  # elements of one [chunk, vocab] block: 256 MiB in float32
LENGTH_BUCKETS = 4  # most length groups one batch of rows is split into (1: one padded block)
GROUP_COST = 0.02  # a group's fixed cost, as a fraction of the unsplit block's positions


def chunk_positions(chunk_size: int, vocab: int) -> int:
    """Positions per output-layer chunk: `chunk_size`, fewer when `chunk_size * vocab` would exceed
    `LOGIT_BUDGET` (a 128,256-token vocabulary: 523 positions instead of 1024)."""
    return max(1, min(chunk_size, LOGIT_BUDGET // vocab))


@dataclass
class ResponseStates:
    """Hidden states that predict response tokens, flattened over the batch."""

    hidden: Tensor  # (N, H) state at t-1 for every response token t
    labels: Tensor  # (N,) the response tokens
    rows: Tensor  # (N,) row index of each token
    cols: Tensor  # (N,) position t of each token


def length_groups(lengths: list[int], max_groups: int = LENGTH_BUCKETS,
                  group_cost: float = GROUP_COST, max_cuts: int = 256) -> list[list[int]]:
    """Row indices split into at most `max_groups` groups of similar length, minimising the padded
    positions sum(len(group) * longest in group) plus `group_cost * len(rows) * max(lengths)` per
    group (each extra forward pass has a fixed cost). Groups are in increasing length. Exact over
    contiguous splits of the sorted rows; with more than `max_cuts` rows, groups may only start
    at `max_cuts` evenly spaced places (the search is quadratic in them)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    L, n = [lengths[i] for i in order], len(order)
    if n <= 1 or max_groups <= 1:
        return [order] if n else []
    fixed = group_cost * n * L[-1]
    cuts = sorted({round(i * n / max_cuts) for i in range(max_cuts + 1)}) if n > max_cuts \
        else list(range(n + 1))
    m, inf = len(cuts) - 1, float("inf")
    # best[k][j]: cheapest split of rows [0, cuts[j]) into k groups; back[k][j]: the last one's start
    best = [[inf] * (m + 1) for _ in range(max_groups + 1)]
    back = [[0] * (m + 1) for _ in range(max_groups + 1)]
    best[0][0] = 0.0
    for k in range(1, max_groups + 1):
        for j in range(1, m + 1):
            for i in range(k - 1, j):
                cost = best[k - 1][i] + (cuts[j] - cuts[i]) * L[cuts[j] - 1] + fixed
                if cost < best[k][j]:
                    best[k][j], back[k][j] = cost, i
    k = min(range(1, max_groups + 1), key=lambda k: best[k][m])
    groups, j = [], m
    for k in range(k, 0, -1):
        groups.append(order[cuts[back[k][j]]:cuts[j]])
        j = back[k][j]
    return groups[::-1]


def _decoder_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                    position_ids: Tensor | None) -> Tensor:  # (R, T, H)
    out = hf_model(model).base_model(input_ids=input_ids, attention_mask=attention_mask,
                                     position_ids=position_ids, use_cache=False)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def states_at(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
              position_ids: Tensor | None, lengths: Tensor, rows: Tensor, cols: Tensor,
              max_groups: int | None = None) -> Tensor:
    """Decoder states at (rows, cols), (N, H), running the rows in at most `max_groups` length
    groups (None: `LENGTH_BUCKETS`, read at call time; see the module docstring). `lengths`
    (R,): tokens before each row's padding; a 4-D mask is sliced on both axes."""
    groups = length_groups(lengths.tolist(), LENGTH_BUCKETS if max_groups is None else max_groups)
    if len(groups) <= 1:
        return _decoder_hidden(model, input_ids, attention_mask, position_ids)[rows, cols]
    group_of = torch.empty(input_ids.shape[0], dtype=torch.long, device=rows.device)
    local = torch.empty_like(group_of)  # each row's index within its group
    for g, group in enumerate(groups):
        idx = torch.tensor(group, dtype=torch.long, device=rows.device)
        group_of[idx], local[idx] = g, torch.arange(len(group), device=rows.device)
    parts, where = [], []
    for g, group in enumerate(groups):
        idx = torch.tensor(group, dtype=torch.long, device=input_ids.device)
        T = int(lengths[idx].max())
        mask = attention_mask[idx, :T] if attention_mask.dim() == 2 else \
            attention_mask[idx][:, :, :T, :T]
        pos = None if position_ids is None else position_ids[idx, :T]
        hidden = _decoder_hidden(model, input_ids[idx, :T], mask, pos)  # (g, T, H)
        sel = (group_of[rows] == g).nonzero().squeeze(-1)  # (n_g,) the entries in this group
        parts.append(hidden[local[rows[sel]], cols[sel]])
        where.append(sel)
    return torch.cat(parts)[torch.cat(where).argsort()]  # back to the order of (rows, cols)


def row_lengths(attention_mask: Tensor) -> Tensor:
    """(R, T) right-padded mask -> (R,) position after each row's last token."""
    T = attention_mask.shape[1]
    last = T - attention_mask.flip(1).to(torch.long).argmax(1)
    return torch.where(attention_mask.any(1), last, torch.ones_like(last))


def response_targets(response_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(R, T) response mask -> (rows, cols), (N,) each: the scored tokens, row by row (a token in
    column 0 has no predecessor and is not scored)."""
    target = response_mask.clone()
    target[:, 0] = False
    return target.nonzero(as_tuple=True)


def response_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                    response_mask: Tensor, position_ids: Tensor | None = None,
                    max_groups: int | None = None) -> ResponseStates:
    """Run the decoder over all rows and keep the states that predict response tokens."""
    rows, cols = response_targets(response_mask)  # (N,), (N,)
    hidden = states_at(model, input_ids, attention_mask, position_ids, row_lengths(attention_mask),
                       rows, cols - 1, max_groups)
    return ResponseStates(hidden, input_ids[rows, cols], rows, cols)


def sample_states(model: nn.Module, samples: Rows, max_groups: int | None = None
                  ) -> ResponseStates:
    """`response_states` of sampled rows, the same (N,) states in the same order on the rows' (S, T)
    grid, with each prompt run once for all the consecutive rows that repeat it (its k samples;
    `softpo.packing.share_prompts`) when the attention takes a 4-D mask and that pays."""
    packed = None
    try:
        style = packable_style(model)
        width = hf_model(model).get_input_embeddings().weight.shape[1]
        packed = share_prompts(samples, style, width)
    except ValueError:  # no 4-D mask or no plain output layer: one row per sample
        pass
    if packed is None:
        return response_states(model, samples.input_ids, samples.attention_mask,
                               samples.response_mask, max_groups=max_groups)
    rows, cols = response_targets(samples.response_mask)  # (N,) the padded grid's order
    hidden = states_at(model, packed.input_ids, packed.attention_mask, packed.position_ids,
                       packed.lengths, packed.rows, packed.prev, max_groups)
    return ResponseStates(hidden, samples.input_ids[rows, cols], rows, cols)


def packed_states(model: nn.Module, packed: PackedRows, max_groups: int | None = None
                  ) -> ResponseStates:
    """Packed rows (see softpo/packing.py); the states are indexed by response (`rows` = response
    index) so that sums over `cols` give per-response sums."""
    hidden = states_at(model, packed.input_ids, packed.attention_mask, packed.position_ids,
                       packed.lengths, packed.rows, packed.prev, max_groups)
    return ResponseStates(hidden, packed.input_ids[packed.rows, packed.cols], packed.owner,
                          packed.cols)


def score_tokens(model: nn.Module, rows: "Rows | PackedRows", chunk_size: int,
                 max_groups: int | None = None) -> Tensor:
    """Per-token log-probs of the response tokens on an (R, T) grid, R = responses, 0 elsewhere:
    from padded rows (column t = position t) or packed rows (column = position in the packed row)."""
    if isinstance(rows, PackedRows):
        states = packed_states(model, rows, max_groups)
        shape = (rows.num_responses, rows.input_ids.shape[1])
    else:
        states = response_states(model, rows.input_ids, rows.attention_mask, rows.response_mask,
                                 max_groups=max_groups)
        shape = tuple(rows.input_ids.shape)
    head = hf_model(model).get_output_embeddings()
    return scatter_rows(label_logps(states, head, chunk_size), states, shape)


class _LabelLogSoftmax(torch.autograd.Function):
    """log softmax(h W^T + b)[label] for one chunk, (n,), without keeping the logits.

    Forward keeps h and the log-normaliser; backward recomputes the logits once and turns them in
    place into g * (onehot(label) - softmax), then two matmuls. The same result as checkpointing
    the autograd formula, with a third of the passes over the logits block: no second logsumexp,
    no zero-filled gather gradient. The block is held vocabulary-major, (V, n) = W h^T, the layout
    in which all three matmuls run fastest on the CPU (about 10% over (n, V) at 1024 positions).
    Matmuls run in the dtype the forward's logits came out in (bf16 under autocast), softmax in
    float32, as autocast would."""

    @staticmethod
    def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # (V, n)
        logits = weight @ hidden.t()
        return logits if bias is None else logits + bias.to(logits.dtype)[:, None]

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor) -> Tensor:
        logits = _LabelLogSoftmax._logits(hidden, weight, bias)  # (V, n)
        ctx.compute_dtype = logits.dtype
        logits = logits.float()
        lse = logits.logsumexp(0)  # (n,)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        return logits[labels, torch.arange(len(labels), device=labels.device)] - lse

    @staticmethod
    def backward(ctx, grad: Tensor):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        dt = ctx.compute_dtype
        h, w = hidden.to(dt), weight.to(dt)
        logits = _LabelLogSoftmax._logits(h, w, bias).float()  # (V, n)
        d_logits = logits.sub_(lse[None]).exp_().mul_(-grad[None])  # -g * softmax
        d_logits[labels, torch.arange(len(labels), device=labels.device)] += grad
        d_low = d_logits.to(dt)
        need_h, need_w, need_b, _ = ctx.needs_input_grad
        d_h = (d_low.t() @ w).to(hidden.dtype) if need_h else None
        d_w = (d_low @ h).to(weight.dtype) if need_w else None
        d_b = d_logits.sum(1).to(bias.dtype) if need_b else None
        return d_h, d_w, d_b, None


def _label_logps(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor) -> Tensor:
    logits = nn.functional.linear(hidden, weight, bias).float()  # (n, V)
    return logits.gather(-1, labels[:, None]).squeeze(-1) - logits.logsumexp(-1)  # (n,)


def label_logps(states: ResponseStates, head: nn.Linear, chunk_size: int = DEFAULT_CHUNK) -> Tensor:
    """log softmax(head(h))[label] for every state, chunked; in training each chunk's logits are
    recomputed in backward (`_LabelLogSoftmax`).  Returns (N,)."""
    parts = []
    chunk_size = chunk_positions(chunk_size, head.weight.shape[0])
    for start in range(0, states.labels.numel(), chunk_size):
        h = states.hidden[start:start + chunk_size]
        y = states.labels[start:start + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or head.weight.requires_grad):
            parts.append(_LabelLogSoftmax.apply(h, head.weight, head.bias, y))
        else:
            parts.append(_label_logps(h, head.weight, head.bias, y))
    return torch.cat(parts) if parts else states.hidden.new_zeros(0, dtype=torch.float32)


def _float(x: Tensor) -> Tensor:
    """Half precision -> float32; float32 and float64 kept (the precision of softmaxes)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class _TokenKL(torch.autograd.Function):
    """For one chunk of n positions: the exact KL(pi || ref) over the vocabulary and the label's
    log-prob under pi, (n,) each, pi = softmax(h W^T + b).

    `ref` is the reference's log-probs, (V, n), or a function that computes them (called again in
    backward). Forward keeps h, pi's log-normaliser and the KL, and with `keep` pi's log-probs
    (one (V, n) block, held until backward; else backward recomputes the logits). Backward turns
    them into the gradient with respect to the logits z,
        dKL/dz = p * (log p - log q - KL),  dlogp(label)/dz = onehot(label) - p,
    (KL = sum_v p_v (log p_v - log q_v): its derivative in log p is p (log p - log q + 1), and
    through the softmax v -> v - p * sum(v) that is p (log p - log q - KL)), then two matmuls.
    Against autograd through `losses.exact_token_kl` with recomputation (its predecessor): one or
    two fewer matmuls and about half the passes over the logits block. Vocabulary-major (V, n)
    and the dtypes as in `_LabelLogSoftmax`."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                ref: "Tensor | Callable[[], Tensor]", keep: bool) -> tuple[Tensor, Tensor]:
        logits = _LabelLogSoftmax._logits(hidden, weight, bias)  # (V, n)
        ctx.compute_dtype = logits.dtype
        logp = _float(logits)
        lse = logp.logsumexp(0)  # (n,)
        logp.sub_(lse)  # (V, n) log p
        ref_logp = ref() if callable(ref) else ref  # (V, n) log q
        label_logp = logp[labels, torch.arange(len(labels), device=labels.device)]  # (n,)
        log_ratio = torch.sub(logp, ref_logp)  # (V, n)
        kl = log_ratio.mul_(logp.exp() if keep else logp.exp_()).sum(0)  # (n,)
        ctx.ref = ref if callable(ref) else None
        ctx.save_for_backward(hidden, weight, bias, labels, lse, kl,
                              None if callable(ref) else ref_logp, logp if keep else None)
        return kl, label_logp

    @staticmethod
    def backward(ctx, g_kl: Tensor, g_lp: Tensor):
        hidden, weight, bias, labels, lse, kl, ref_logp, logp = ctx.saved_tensors
        dt = ctx.compute_dtype
        h, w = hidden.to(dt), weight.to(dt)
        kept = logp is not None
        if not kept:
            logp = _float(_LabelLogSoftmax._logits(h, w, bias)).sub_(lse)  # (V, n) log p
        ref_logp = ctx.ref() if ref_logp is None else ref_logp
        d_logits = torch.sub(logp, ref_logp).sub_(kl).mul_(g_kl).sub_(g_lp)  # (V, n)
        d_logits.mul_(logp.exp() if kept else logp.exp_())  # g_kl p (log p - log q - KL) - g_lp p
        d_logits[labels, torch.arange(len(labels), device=labels.device)] += g_lp
        d_low = d_logits.to(dt)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        d_h = (d_low.t() @ w).to(hidden.dtype) if need_h else None
        d_w = (d_low @ h).to(weight.dtype) if need_w else None
        d_b = d_logits.sum(1).to(bias.dtype) if need_b else None
        return d_h, d_w, d_b, None, None, None


def head_log_probs(head: Callable[[Tensor], Tensor], hidden: Tensor) -> Tensor:  # (V, n)
    """log softmax of `head(hidden)` (no grad), vocabulary-major: (n, H) -> (V, n) float32
    (float64 kept). A plain `nn.Linear` runs as `W h^T` (the faster layout on the CPU)."""
    with torch.no_grad():
        if type(head) is nn.Linear:
            logits = _float(_LabelLogSoftmax._logits(hidden, head.weight, head.bias))
            return logits.sub_(logits.logsumexp(0))
        return _float(head(hidden)).log_softmax(-1).t().contiguous()


def token_kl_and_logps(policy: ResponseStates, ref_hidden: Tensor | None, head: nn.Linear,
                       ref_head: Callable[[Tensor], Tensor] | None,
                       chunk_size: int = DEFAULT_CHUNK, ref_logp: Tensor | None = None
                       ) -> tuple[Tensor, Tensor]:
    """Exact per-position KL(pi || ref) over the vocabulary and the policy's label log-probs,
    two (N,) tensors, chunked (`_TokenKL`; when the N positions are one chunk, the policy's
    log-probs there are kept for backward instead of recomputed: at most `LOGIT_BUDGET` elements).

    The reference is `ref_logp`, its log-probs at the same positions, (V, N) (`head_log_probs`);
    or, without them, `ref_hidden` (N, H), the reference model's states there, and `ref_head`,
    which maps them to logits (for LoRA: the output layer with the adapter disabled), recomputed
    per chunk in forward and backward.
    """
    kls, logps = [], []
    chunk_size = chunk_positions(chunk_size, head.weight.shape[0])
    keep = policy.labels.numel() <= chunk_size  # one chunk: its log-probs kept for backward
    for start in range(0, policy.labels.numel(), chunk_size):
        sl = slice(start, start + chunk_size)
        if ref_logp is not None:
            ref = ref_logp[:, sl]
        else:
            ref = functools.partial(head_log_probs, ref_head, ref_hidden[sl])
        kl, lp = _TokenKL.apply(policy.hidden[sl], head.weight, head.bias, policy.labels[sl], ref,
                                keep)
        kls.append(kl)
        logps.append(lp)
    return torch.cat(kls), torch.cat(logps)


def scatter_rows(values: Tensor, states: ResponseStates, shape: tuple[int, int]) -> Tensor:
    """(N,) per-token values back to a zero-padded (R, T) grid."""
    grid = values.new_zeros(shape)
    return grid.index_put((states.rows, states.cols), values)


def full_logits_label_logps(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                            response_mask: Tensor) -> Tensor:
    """Fallback for heads that are not a plain Linear: full forward, then log-softmax.  (R, T)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logps = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, input_ids[:, 1:, None])[..., 0]
    out = torch.zeros_like(response_mask, dtype=torch.float32)
    out[:, 1:] = logps
    return out * response_mask


def token_logps(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor,
                chunk_size: int = DEFAULT_CHUNK, autocast: bool = False,
                full_logits: bool = False) -> Tensor:
    """Per-token log-probs of the response tokens, zero elsewhere.  Returns (R, T) float32.
    `full_logits` (or a head that is not a plain Linear): from the whole logits of one block."""
    ctx = torch.autocast(input_ids.device.type, dtype=torch.bfloat16) if autocast else nullcontext()
    with ctx:
        if full_logits or not has_plain_head(model):
            return full_logits_label_logps(model, input_ids, attention_mask, response_mask)
        states = response_states(model, input_ids, attention_mask, response_mask)
        head = hf_model(model).get_output_embeddings()
        values = label_logps(states, head, chunk_size)
    return scatter_rows(values, states, tuple(input_ids.shape))


def sequence_logps(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor,
                   chunk_size: int = DEFAULT_CHUNK, autocast: bool = False,
                   full_logits: bool = False) -> Tensor:
    """Summed response log-probs per row.  Returns (R,) float32."""
    return token_logps(model, input_ids, attention_mask, response_mask, chunk_size, autocast,
                       full_logits).sum(-1)


@dataclass
class Scores:
    """What one forward of the policy gives: per-token log-probs of the rows and of the samples,
    and the exact per-position KL on the samples."""

    token_logps: Tensor  # (R, T) policy log-probs of the preference rows' response tokens, 0 elsewhere
    sample_token_logps: Tensor | None = None  # (S, T') same for the regulariser's sample rows
    sample_token_kl: Tensor | None = None  # (S, T') exact per-position KL(pi || ref), 0 elsewhere


class PolicyScorer(nn.Module):
    """The one differentiable forward of a training step, as a module so DDP/FSDP can wrap it.

    One call scores the preference rows and, when given, the regulariser's sample rows (with the
    reference's log-probs, or its states, for the exact per-position KL). Everything that needs
    gradient goes through `forward`, which is what Accelerate's DDP wrapper synchronises.
    `length_buckets`: the most length groups a call runs (1 under FSDP, where every process must
    run as many decoder forwards; `softpo.distributed`). `full_logits`: the rows from the whole
    logits of one padded block (`model.full_logits`); the samples as before.
    """

    def __init__(self, model: nn.Module, chunk_size: int = DEFAULT_CHUNK, autocast: bool = False,
                 length_buckets: int | None = None, full_logits: bool = False):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.autocast = autocast
        self.length_buckets = length_buckets
        self.full_logits = full_logits

    def _ctx(self, device: torch.device):
        return torch.autocast(device.type, dtype=torch.bfloat16) if self.autocast else nullcontext()

    def forward(self, rows: Rows | PackedRows | None = None, samples: Rows | None = None,
                ref_sample_hidden: Tensor | None = None,
                ref_head: Callable[[Tensor], Tensor] | None = None, *,
                ref_sample_logp: Tensor | None = None,
                call: Callable[[nn.Module], Any] | None = None) -> Scores:
        """Score the preference rows and, when given, the regulariser's samples: with the
        reference's log-probs at the sampled positions (`ref_sample_logp`, (V, N)) or its states
        there and its output layer (`ref_sample_hidden`, `ref_head`), also the exact per-position
        KL. With `call`, instead `call(model)` inside this forward, where an engine that gathers
        parameters in forward hooks (FSDP2) has gathered them (`softpo.distributed.call_whole`)."""
        if call is not None:
            return call(self.model)
        device = rows.input_ids.device
        with self._ctx(device):
            if self.full_logits or not has_plain_head(self.model):
                logps = full_logits_label_logps(self.model, rows.input_ids, rows.attention_mask,
                                                rows.response_mask)
            else:
                logps = self._score(rows)
            if samples is None:
                return Scores(logps)
            return self._score_samples(logps, samples, ref_sample_hidden, ref_head,
                                       ref_sample_logp)

    def _score_samples(self, logps: Tensor, samples: Rows, ref_hidden: Tensor | None,
                       ref_head: Callable[[Tensor], Tensor] | None,
                       ref_logp: Tensor | None) -> Scores:
        states = sample_states(self.model, samples, self.length_buckets)
        shape = tuple(samples.input_ids.shape)
        head = hf_model(self.model).get_output_embeddings()
        if ref_hidden is None and ref_logp is None:  # sequence-level estimators: no distributions
            return Scores(logps, scatter_rows(label_logps(states, head, self.chunk_size), states,
                                              shape))
        kl, lp = token_kl_and_logps(states, ref_hidden, head, ref_head, self.chunk_size, ref_logp)
        return Scores(logps, scatter_rows(lp, states, shape), scatter_rows(kl, states, shape))

    def _score(self, rows: Rows | PackedRows) -> Tensor:
        return score_tokens(self.model, rows, self.chunk_size, self.length_buckets)


class Reference:
    """The frozen reference: a separate model, or the policy with its LoRA adapter disabled."""

    def __init__(self, model: nn.Module, adapter_toggle: bool, chunk_size: int = DEFAULT_CHUNK,
                 autocast: bool = False, full_logits: bool = False):
        self.model = model  # for adapter_toggle: the PEFT policy itself
        self.adapter_toggle = adapter_toggle
        self.chunk_size = chunk_size
        self.autocast = autocast
        self.full_logits = full_logits  # padded rows from the whole logits (`model.full_logits`)

    def disabled(self):
        """Context in which `self.model` computes the reference."""
        peft = getattr(self.model, "module", self.model)
        return peft.disable_adapter() if self.adapter_toggle else nullcontext()

    @torch.no_grad()
    def sequence_logps(self, rows: Rows | PackedRows) -> Tensor:  # (R,)
        """Summed response log-probs of the rows under the reference."""
        if isinstance(rows, PackedRows):
            ctx = torch.autocast(rows.input_ids.device.type, dtype=torch.bfloat16) \
                if self.autocast else nullcontext()
            with self.disabled(), ctx:
                return score_tokens(self.model, rows, self.chunk_size).sum(-1)
        with self.disabled():
            return sequence_logps(self.model, rows.input_ids, rows.attention_mask, rows.response_mask,
                                  self.chunk_size, self.autocast, self.full_logits)

    @torch.no_grad()
    def token_logps(self, rows: Rows) -> Tensor:  # (R, T)
        """Per-token log-probs of the rows' response tokens under the reference."""
        with self.disabled():
            return token_logps(self.model, rows.input_ids, rows.attention_mask, rows.response_mask,
                               self.chunk_size, self.autocast)

    def _autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=torch.bfloat16) if self.autocast else nullcontext()

    @torch.no_grad()
    def sample_hidden(self, samples: Rows) -> Tensor:  # (N, H)
        """The reference's states that predict the samples' tokens."""
        with self.disabled(), self._autocast(samples.input_ids.device):
            return sample_states(self.model, samples).hidden

    @torch.no_grad()
    def sample_view(self, samples: Rows, keep_logps: bool = False
                    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """One reference forward over the sampled rows, each prompt run once for its samples
        (`sample_states`): the states at the sampled positions (N, H), the sampled tokens'
        log-probs on the (S, T) grid, and with `keep_logps`, when the N positions fit in one
        output-layer chunk (`chunk_positions`: N * V <= LOGIT_BUDGET), the full log-probs there,
        (V, N) float32, so that the token KL need not recompute them (else None)."""
        if not has_plain_head(self.model):
            return self.sample_hidden(samples), self.token_logps(samples), None
        with self.disabled(), self._autocast(samples.input_ids.device):
            states = sample_states(self.model, samples)
            head = hf_model(self.model).get_output_embeddings()
            if keep_logps and len(states.labels) <= chunk_positions(self.chunk_size,
                                                                    head.weight.shape[0]):
                full = head_log_probs(head, states.hidden)  # (V, N)
                values = full[states.labels, torch.arange(len(states.labels), device=full.device)]
            else:
                full, values = None, label_logps(states, head, self.chunk_size)
        return states.hidden, scatter_rows(values, states, tuple(samples.input_ids.shape)), full

    @torch.no_grad()
    def sample_logps(self, samples: Rows) -> Tensor:  # (S, T)
        """The sampled tokens' log-probs under the reference (`sample_view`'s second part)."""
        if not has_plain_head(self.model):
            return self.token_logps(samples)
        return self.sample_view(samples)[1]

    def head(self, hidden: Tensor) -> Tensor:  # (n, H) -> (n, V), no grad
        """The reference's output layer applied to `hidden` (no grad)."""
        with torch.no_grad(), self.disabled():
            return hf_model(self.model).get_output_embeddings()(hidden)
