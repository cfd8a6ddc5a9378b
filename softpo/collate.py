"""Tokens and batches: `PreferenceExample` -> `TokenizedExample` -> `PreferenceBatch`; the one
prompt encoder; the order in which a run reads its rows.

Tokenisation (`tokenize_example`)
---------------------------------
* Strings: the prompt is encoded with the tokenizer's special tokens (BOS if it adds one, never a
  trailing EOS, never two BOS), each response without special tokens and followed by EOS.
* Conversations, when the tokenizer has a chat template and `chat_template="auto"`: the prompt is
  `apply_chat_template(prompt, add_generation_prompt=True)` and a response is the rest of the
  rendering of the whole conversation `prompt + response`, so that prompt text + response text is
  exactly the template's rendering; the template's end-of-turn token (`<|im_end|>`, `<|eot_id|>`,
  ...) ends the response, and EOS is appended only if the response text holds no special token at
  all. Both are encoded without special tokens: the template already wrote them. If a template
  renders the prompt differently inside the full conversation (some strip or rewrite turns), the
  response falls back to its message contents + EOS, a warning says so, and the report counts the
  rows. A template that raises on a conversation (e.g. no system role) makes it a bad row.
* Conversations otherwise (`chat_template="never"`, or no template): plain text, one
  `role: content` line per message, the prompt ending in `assistant: `, then tokenised as strings.

Batched tokenisation (`tokenize_stream`, `tokenize_examples`)
-------------------------------------------------------------
Rows are rendered, then encoded a chunk at a time with one tokenizer call per kind of text (a fast
tokenizer encodes a batch in parallel in Rust) in a background thread while the next rows are read
and rendered, then cut by the same code as `tokenize_example`: the results are identical to it, row
by row, bad rows and their messages included (tests/test_tokenize_batched.py). Kept ids are lists of
shared int objects (`intern_ids`): 8 bytes a token instead of 36. `softpo.tokcache` keeps a
tokenised source on disk.

The one prompt encoder (`encode_prompt`)
-------------------------------------------
A prompt becomes tokens in one way, whatever reads it: training rows, the regulariser's prompts,
`softpo sample`, `softpo build-prefs`, evaluation. It is rendered as above (`render_prompt`),
encoded (`_prompt_ids`) and cut to its last `max_prompt_length` tokens, so a response is trained
after exactly the tokens it was sampled after. `prompt_batch` left-pads a list of them for
`generate()`.

Truncation (counted in the `DataReport`, never silent)
------------------------------------------------------
1. A prompt of >= `max_length` tokens is a bad row (error, or skipped with `on_bad_rows="skip"`).
2. A prompt longer than `max_prompt_length` keeps its *last* `max_prompt_length` tokens
   (`rows_truncated_prompt`).
3. Each response keeps its first `max_length - len(prompt)` tokens (`rows_truncated_response`
   counts rows with at least one cut response; a cut response loses its EOS).

Batch layout (`collate`)
------------------------
B examples with up to n responses give R = B * n rows, example-major: row `b * n + j` is prompt b
followed by its response j (preference order, j = 0 best), right-padded with `pad_token_id` to T.
`response_mask[r, t]` is True where `input_ids[r, t]` is a response token (EOS included), so with
`logits[:, t]` predicting `input_ids[:, t + 1]`:
    logp(y_j | x_b) = sum_t response_mask[r, t] * log_softmax(logits[r, t - 1])[input_ids[r, t]].
Position 0 is never a response token (prompts have >= 1 token). Examples with fewer than n
responses get padding rows: the prompt alone, `response_mask` all False, `response_valid` False.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import torch
from torch import Tensor

from softpo.config import DataConfig
from softpo.data import BadRowError, DataReport, PreferenceExample, Text


@dataclass
class TokenizedExample:
    """One example as token ids: a prompt and its responses in preference order."""

    prompt_ids: list[int]  # after truncation
    response_ids: list[list[int]]  # preference order, each after truncation
    kind: str
    source: str
    row: int
    prompt_text: str  # the rendered prompt, for reports and sampling
    truncated_prompt: bool = False
    truncated_response: bool = False
    template_fallback: bool = False


# ---------------------------------------------------------------- tokenisation

def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _batch_ids(tokenizer: Any, texts: list[str], special: bool) -> list[list[int]]:
    """`_ids` of every text in one tokenizer call (a fast tokenizer encodes them in parallel)."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=special, return_attention_mask=False,
                     return_token_type_ids=False)["input_ids"]


class _Marks(NamedTuple):
    """What the special-token rules read from a tokenizer, read once."""

    bos: int | None
    eos: int | None
    eos_text: str
    specials: list[str]

    @classmethod
    def of(cls, tokenizer: Any) -> "_Marks":
        return cls(tokenizer.bos_token_id, tokenizer.eos_token_id, str(tokenizer.eos_token),
                   list(getattr(tokenizer, "all_special_tokens", [])))


def _plain_fix(marks: _Marks, ids: list[int], text: str) -> list[int]:
    """A plain-text prompt keeps the tokenizer's leading special tokens: no EOS, no doubled BOS."""
    if marks.eos is not None and ids and ids[-1] == marks.eos and not text.endswith(marks.eos_text):
        ids = ids[:-1]
    while marks.bos is not None and ids[:2] == [marks.bos, marks.bos]:
        ids = ids[1:]
    return ids


def _encode_plain(tokenizer: Any, text: str) -> list[int]:
    """A plain-text prompt with the tokenizer's leading special tokens: no EOS, no doubled BOS."""
    return _plain_fix(_Marks.of(tokenizer), _ids(tokenizer, text, True), text)


def _with_eos(marks: _Marks, ids: list[int], text: str) -> list[int]:
    """EOS after a response, unless its templated text already ends the turn with a special token."""
    ended = any(s in text for s in marks.specials)
    return ids if marks.eos is None or ended else ids + [marks.eos]


def _plain(messages: list[dict[str, str]]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _uses_template(tokenizer: Any, cfg: DataConfig) -> bool:
    return cfg.chat_template == "auto" and bool(getattr(tokenizer, "chat_template", None))


def render_prompt(prompt: Text, tokenizer: Any, cfg: DataConfig) -> tuple[str, bool]:
    """(prompt text, whether it came from the chat template and so carries its special tokens)."""
    if isinstance(prompt, str):
        return prompt, False
    if not _uses_template(tokenizer, cfg):
        return _plain(prompt) + "\nassistant: ", False
    return _template(tokenizer, prompt, True), True


def _prompt_ids(tokenizer: Any, text: str, templated: bool) -> list[int]:
    """A rendered prompt's ids, before truncation: a templated text already holds its special
    tokens; a plain one gets the tokenizer's leading ones."""
    return _ids(tokenizer, text, False) if templated else _encode_plain(tokenizer, text)


def encode_prompt(prompt: Text, tokenizer: Any, cfg: DataConfig) -> list[int]:
    """The one prompt encoder (module docstring): render, encode, keep the last
    `cfg.max_prompt_length` tokens. Training rows (`tokenize_example`), the regulariser,
    sampling, build-prefs and evaluation all read a prompt through it."""
    return _prompt_ids(tokenizer, *render_prompt(prompt, tokenizer, cfg))[-cfg.max_prompt_length:]


def prompt_batch(prompts: Sequence[Text], tokenizer: Any, cfg: DataConfig) -> tuple[Tensor, Tensor]:
    """Prompts -> (P, Lp) left-padded ids and mask for `generate()`, each by `encode_prompt`."""
    return left_pad([encode_prompt(p, tokenizer, cfg) for p in prompts], pad_token_id(tokenizer))


def _template(tokenizer: Any, messages: list, generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja raises TemplateError (or anything a template `raise`s)
        raise BadRowError(f"the chat template rejects this conversation ({type(e).__name__}: {e})",
                          reason="chat_template") from None


def render(example: PreferenceExample, tokenizer: Any,
           cfg: DataConfig) -> tuple[str, list[str], bool, bool]:
    """(prompt text, response texts, texts carry special tokens, template fell back)."""
    prompt_text, templated = render_prompt(example.prompt, tokenizer, cfg)
    if not example.is_chat:
        return prompt_text, list(example.responses), False, False
    if not templated:  # the prompt ends with "assistant: "; the response follows
        return prompt_text, [r[0]["content"] + ("\n" + _plain(r[1:]) if len(r) > 1 else "")
                             for r in example.responses], False, False
    texts, fallback = [], False
    for r in example.responses:
        full = _template(tokenizer, example.prompt + r, False)
        fallback |= not full.startswith(prompt_text)
        texts.append(full[len(prompt_text):] if full.startswith(prompt_text)
                     else "\n".join(m["content"] for m in r))
    return prompt_text, texts, True, fallback


def _render_row(example: PreferenceExample, tokenizer: Any,
                cfg: DataConfig) -> tuple[str, list[str], bool, bool] | BadRowError:
    """`render`, or the bad-row error it raised, naming the row."""
    try:
        return render(example, tokenizer, cfg)
    except BadRowError as e:
        return BadRowError(e.detail, reason=e.reason, source=example.source, row=example.row,
                           field="prompt")


_warned: set[int] = set()


def warn_template_fallback(tokenizer: Any) -> None:
    """Warn (once per tokenizer) that some rows fell back from the template's turn rendering."""
    if id(tokenizer) not in _warned:
        _warned.add(id(tokenizer))
        warnings.warn("the chat template renders the prompt differently inside the full "
                      "conversation than with add_generation_prompt=True, so prompt + response "
                      "cannot equal the full rendering; such responses are tokenised as their "
                      "message contents + EOS", stacklevel=3)


_INTS: list[int] = list(range(1 << 16))  # _INTS[i] is i: one shared int object per token id


def shared_ints(top: int) -> list[int]:
    """The shared int objects for 0..top (`intern_ids`)."""
    if top >= len(_INTS):
        _INTS.extend(range(len(_INTS), max(top + 1, 2 * len(_INTS))))
    return _INTS[:top + 1]


def intern_ids(ids: Sequence[int]) -> list[int]:
    """The same ids as a list of shared int objects: CPython makes a new 28-byte object for every
    int above 256, so a list of token ids costs 36 bytes a token; with shared objects, 8."""
    try:
        return list(map(_INTS.__getitem__, ids))  # token ids are never negative
    except IndexError:
        shared_ints(max(ids))
        return list(map(_INTS.__getitem__, ids))


def _finish(example: PreferenceExample, prompt_text: str, prompt_ids: list[int],
            responses: list[list[int]], fallback: bool, cfg: DataConfig) -> TokenizedExample:
    """Both tokenisation paths end here: the bad-row checks and truncation (module docstring)."""
    if not prompt_ids:
        raise BadRowError("renders to no tokens", reason="empty_text", source=example.source,
                          row=example.row, field="prompt")
    if len(prompt_ids) >= cfg.max_length:
        raise BadRowError(f"has {len(prompt_ids)} tokens, at least max_length={cfg.max_length}, "
                          "leaving no room for a response", reason="prompt_too_long",
                          source=example.source, row=example.row, field="prompt")
    cut_prompt = len(prompt_ids) > cfg.max_prompt_length
    prompt_ids = intern_ids(prompt_ids[-cfg.max_prompt_length:])  # = encode_prompt(...)
    room = cfg.max_length - len(prompt_ids)
    return TokenizedExample(prompt_ids, [intern_ids(r[:room]) for r in responses], example.kind,
                            example.source, example.row, prompt_text, cut_prompt,
                            any(len(r) > room for r in responses), fallback)


def tokenize_example(example: PreferenceExample, tokenizer: Any,
                     cfg: DataConfig) -> TokenizedExample:
    """Prompt ids + each response's ids, truncated as the module docstring says."""
    rendered = _render_row(example, tokenizer, cfg)
    if isinstance(rendered, BadRowError):
        raise rendered
    prompt_text, texts, templated, fallback = rendered
    prompt_ids = _prompt_ids(tokenizer, prompt_text, templated)  # encode_prompt, before the cut
    marks = _Marks.of(tokenizer)
    responses = [_with_eos(marks, _ids(tokenizer, t, False), t if templated else "")
                 for t in texts]  # plain strings always get EOS
    if fallback:
        warn_template_fallback(tokenizer)
    return _finish(example, prompt_text, prompt_ids, responses, fallback, cfg)


# ---------------------------------------------------------------- batched tokenisation

CHUNK = 2048  # rows per batched tokenizer call
Result = TokenizedExample | BadRowError  # one row's tokenisation, or why it is a bad row


def _encode_chunk(tokenizer: Any, rendered: list) -> tuple[list, list, list]:
    """The ids of a chunk's rendered rows in three tokenizer calls: templated prompts and every
    response without special tokens, plain prompts with them. Returns (prompt ids per row or
    None, responses' ids per row or None, the marks)."""
    ok = [r for r in rendered if not isinstance(r, BadRowError)]
    templated = _batch_ids(tokenizer, [r[0] for r in ok if r[2]], False)
    plain = _batch_ids(tokenizer, [r[0] for r in ok if not r[2]], True)
    flat = iter(_batch_ids(tokenizer, [t for r in ok for t in r[1]], False))
    marks, prompts, responses = _Marks.of(tokenizer), [], []
    templated_it, plain_it = iter(templated), iter(plain)
    for r in rendered:
        if isinstance(r, BadRowError):
            prompts.append(None)
            responses.append(None)
            continue
        text, texts, is_templated, _ = r
        prompts.append(next(templated_it) if is_templated else
                       _plain_fix(marks, next(plain_it), text))
        responses.append([_with_eos(marks, next(flat), t if is_templated else "") for t in texts])
    return prompts, responses, marks


def _finish_chunk(examples: list[PreferenceExample], rendered: list, encoded: tuple,
                  tokenizer: Any, cfg: DataConfig) -> list[Result]:
    out: list[Result] = []
    for ex, r, prompt_ids, responses in zip(examples, rendered, encoded[0], encoded[1]):
        if isinstance(r, BadRowError):
            out.append(r)
            continue
        if r[3]:
            warn_template_fallback(tokenizer)
        try:
            out.append(_finish(ex, r[0], prompt_ids, responses, r[3], cfg))
        except BadRowError as e:
            out.append(e)
    return out


def tokenize_stream(examples: Iterable[PreferenceExample], tokenizer: Any, cfg: DataConfig,
                    chunk: int = CHUNK) -> Iterator[tuple[PreferenceExample, Result]]:
    """Each example with `tokenize_example`'s result, or the `BadRowError` it raises, in order.

    Rows are taken `chunk` at a time: rendered here, encoded with batched tokenizer calls (a fast
    tokenizer encodes a batch in parallel in Rust, releasing the GIL) in a background thread while
    the next rows are read and rendered, then cut by the same `_finish` as `tokenize_example`,
    so the results are identical to it."""
    it = iter(examples)
    with ThreadPoolExecutor(1, thread_name_prefix="softpo-tokenize") as pool:
        pending: deque = deque()
        while True:
            rows = list(itertools.islice(it, chunk))
            if rows:
                rendered = [_render_row(ex, tokenizer, cfg) for ex in rows]
                pending.append((rows, rendered, pool.submit(_encode_chunk, tokenizer, rendered)))
            if pending and (len(pending) > 1 or not rows):
                done, rendered_done, job = pending.popleft()
                yield from zip(done, _finish_chunk(done, rendered_done, job.result(), tokenizer, cfg))
            if not rows and not pending:
                return


def collect(results: Iterable[Result], cfg: DataConfig, report: DataReport) -> list[TokenizedExample]:
    """Rows' results -> the kept examples, counted in `report`: a bad row raises, or with
    `on_bad_rows="skip"` is dropped and counted; truncation and lengths recorded."""
    out = []
    for tok in results:
        if isinstance(tok, BadRowError):
            if cfg.on_bad_rows != "skip":
                raise tok
            report.add_bad(tok)
            report.rows_kept -= 1
            continue
        report.rows_truncated_prompt += tok.truncated_prompt
        report.rows_truncated_response += tok.truncated_response
        report.rows_template_fallback += tok.template_fallback
        report.prompt_tokens.append(len(tok.prompt_ids))
        report.response_tokens.extend(len(r) for r in tok.response_ids)
        out.append(tok)
    return out


def tokenize_examples(examples: Sequence[PreferenceExample], tokenizer: Any, cfg: DataConfig,
                      report: DataReport | None = None) -> list[TokenizedExample]:
    """Tokenise all (batched, `tokenize_stream`); prompts too long raise or (skip) are dropped and
    counted; lengths recorded. Equal to `tokenize_example` row by row."""
    report = report if report is not None else DataReport(source="", rows_kept=len(examples))
    return collect((r for _, r in tokenize_stream(examples, tokenizer, cfg)), cfg, report)


# ---------------------------------------------------------------- collation

@dataclass
class PreferenceBatch:
    """B examples x n responses as R = B * n rows (row b * n + j); see the module docstring."""

    input_ids: Tensor  # (R, T) long, right-padded with pad_token_id
    attention_mask: Tensor  # (R, T) long, 1 on real tokens
    response_mask: Tensor  # (R, T) bool, True on response tokens (aligned with input_ids)
    response_valid: Tensor  # (B, n) bool, False for padding responses
    response_lengths: Tensor  # (B, n) long, response tokens per row (0 for padding)

    @property
    def batch_size(self) -> int:
        """B, the examples in the batch."""
        return self.response_valid.shape[0]

    @property
    def num_responses(self) -> int:
        """n, the responses per example (padding responses included)."""
        return self.response_valid.shape[1]

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens in the batch, prompts counted once per row."""
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> "PreferenceBatch":
        """The batch with every tensor on `device`."""
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **moved)


def left_pad(seqs: Sequence[list[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """(B, P) ids left-padded with pad_token_id, and their attention mask."""
    width = max(1, max((len(s) for s in seqs), default=0))
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        if s:
            ids[b, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[b, width - len(s):] = 1
    return ids, mask


def collate(examples: Sequence[TokenizedExample], pad_token_id: int,
            pad_to_multiple_of: int | None = None) -> PreferenceBatch:
    """Tokenised examples -> right-padded rows `[prompt, response_j, pad]` (module docstring)."""
    B, n = len(examples), max(len(e.response_ids) for e in examples)
    T = max(len(e.prompt_ids) + len(r) for e in examples for r in e.response_ids)
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((B * n, T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B * n, T), dtype=torch.long)
    response_mask = torch.zeros((B * n, T), dtype=torch.bool)
    response_lengths = torch.zeros((B, n), dtype=torch.long)
    for b, ex in enumerate(examples):
        P = len(ex.prompt_ids)
        for j in range(n):
            response = ex.response_ids[j] if j < len(ex.response_ids) else []
            seq, r = ex.prompt_ids + response, b * n + j
            input_ids[r, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention_mask[r, :len(seq)] = 1
            response_mask[r, P:len(seq)] = True
            response_lengths[b, j] = len(response)
    counts = torch.tensor([len(e.response_ids) for e in examples])  # (B,)
    return PreferenceBatch(input_ids, attention_mask, response_mask,
                           response_valid=torch.arange(n)[None, :] < counts[:, None],
                           response_lengths=response_lengths)


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (padding is masked out either way)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


# ---------------------------------------------------------------- order

def stream_indices(n: int, start: int, count: int, seed: int) -> list[int]:
    """Positions [start, start+count) of an endless stream of seeded epoch permutations of range(n).

    A run reads its rows (and the regulariser its prompts) from such a stream: batches are a pure
    function of the step, so a resumed run reads exactly what the uninterrupted run read, and N
    processes together read what one process reads with the same global batch.
    """
    out, cache = [], {}
    for i in range(start, start + count):
        epoch, pos = divmod(i, n)
        if epoch not in cache:
            g = torch.Generator().manual_seed(seed * 100_003 + epoch)
            cache[epoch] = torch.randperm(n, generator=g).tolist()
        out.append(cache[epoch][pos])
    return out
