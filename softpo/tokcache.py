"""The tokenised set on disk: a source read, validated and tokenised once, then reused.

`load_tokenized(source, tokenizer, cfg)` is what a run (and `softpo data check --tokenizer`) does
with a source at start-up: read and validate every row (`softpo.data`), tokenise the rows in
batches (`softpo.collate.tokenize_stream`), and keep, for every validated row in file order, its raw
prompt and its `TokenizedExample`, or the `BadRowError` tokenising it gave. With
`data.cache_tokens` (the default) that result is written to `<dir>/<key>.safetensors` and read back
instead of all the work when the same key comes again; the result, its examples and its report are
equal to a fresh one.

What the key holds
------------------
* the data: for a local source (a file, or every file under a folder) the bytes of its files, their
  names within it, the name messages call the source by and the split, so the entry is found
  before anything is read; any other source (a hub dataset, rows in memory) is read and validated
  first and keyed by the validated rows' content;
* the tokenizer: its full serialised state (`backend_tokenizer.to_str()`: vocabulary, merges,
  normalizer, pre-tokenizer, post-processor, added tokens), its class, chat template, special tokens
  and `split_special_tokens`. A tokenizer without a fast backend is never cached;
* the settings that change the result: `max_length`, `max_prompt_length`, `on_bad_rows`,
  `chat_template`;
* the code: `FORMAT`, the transformers and tokenizers versions, and a digest of the softpo modules
  that read, validate and tokenise (readers, data, collate, tokcache), so an edited module never
  reads an entry written by another version of it.
What acts after this step (`eval_fraction`, the seed, the loss) is not in the key.

Files
-----
Numpy arrays in safetensors: `tokens` (T,) uint16 or int32, every kept row's prompt ids and then
each response's ids, after truncation; `spans` (S,) int32, per kept row the prompt's length and
then each response's; `rows` (N,) int64, the row numbers; `info` (N, 4) int32, per row the source
index, the kind index, the number of responses (-1 for a bad row) and flags (truncated prompt,
truncated response, template fallback, conversation); `text` (B,) uint8 with `text_spans` (N, 2)
int64, per row its raw prompt (the string, or a conversation as JSON) and its rendered prompt when
that differs (-1: the same). Metadata: the key's parts, the reading report, the sources, kinds and
bad rows as JSON, and a digest of the metadata and every data byte. The file is streamed to a
temporary name, a chunk of rows at a time, then renamed (a killed run leaves no entry); an entry
whose size or digest does not match is ignored and written again; an entry that cannot be written
(a full disk) is a warning, not an error. Nothing is evicted: delete the folder to reclaim space.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from softpo.collate import (Result, TokenizedExample, shared_ints, tokenize_stream,
                            warn_template_fallback)
from softpo.config import DataConfig
from softpo.data import (BadRowError, DataReport, PreferenceExample, Text, iter_preferences,
                         load_preferences, no_usable_rows, source_name)
from softpo.models import cache_root

FORMAT = 1
DIGEST = 16  # bytes of every blake2b digest
CODE = ("readers", "data", "collate", "tokcache")  # the softpo modules an entry depends on
SETTINGS = ("max_length", "max_prompt_length", "on_bad_rows", "chat_template")
TRUNCATED_PROMPT, TRUNCATED_RESPONSE, FALLBACK, CHAT = 1, 2, 4, 8  # `info` flags
ROWS_PER_READ = 4096  # rows whose tokens become lists at once when an entry is read


@dataclass
class TokenizedSource:
    """A source read, validated and tokenised: per validated row, in file order, its raw prompt
    and its result. `report` counts the reading; `collate.collect` adds the tokenisation."""

    prompts: list[Text]
    results: list[Result]
    report: DataReport


def default_dir() -> Path:
    """`$SOFTPO_CACHE/tokens` (default ~/.cache/softpo/tokens)."""
    return cache_root() / "tokens"


def load_tokenized(source: Any, tokenizer: Any, cfg: DataConfig, *, name: str | None = None,
                   split: str | None = None, cache: bool | None = None,
                   cache_dir: str | Path | None = None) -> TokenizedSource:
    """Read, validate and tokenise `source` (module docstring), through the cache when `cache`
    (default `cfg.cache_tokens`) is on and the tokenizer has a fast backend."""
    name, split = source_name(source, name), split or cfg.split
    on = cfg.cache_tokens if cache is None else cache
    tok = tokenizer_digest(tokenizer) if on else None
    folder = Path(cache_dir) if cache_dir is not None else default_dir()
    files = files_digest(source) if tok else None
    path = None
    if files is not None:  # a local source: the entry is found before anything is read
        path = folder / f"{entry_key(files, name, split, tok, cfg)}.safetensors"
        if (hit := read_entry(path, tokenizer)) is not None:
            return hit
        report = DataReport(source=name)
        examples: Iterable[PreferenceExample] = iter_preferences(
            source, split, report, skip=cfg.on_bad_rows == "skip")
    else:
        examples, report = load_preferences(source, cfg, split=split, name=name)
        if tok:
            path = folder / f"{entry_key(rows_digest(examples), name, split, tok, cfg)}.safetensors"
            if (hit := read_entry(path, tokenizer)) is not None:
                return hit
    result = tokenize_source(examples, report, tokenizer, cfg)
    if path is not None:
        try:
            write_entry(path, result, {"source": name, "split": split, "data": files or "rows",
                                       "tokenizer": str(getattr(tokenizer, "name_or_path", ""))})
        except OSError as e:  # a full disk or a read-only folder: the run goes on, uncached
            warnings.warn(f"the tokenised rows of {name} were not cached ({e})", stacklevel=2)
    return result


def tokenize_source(examples: Iterable[PreferenceExample], report: DataReport, tokenizer: Any,
                    cfg: DataConfig) -> TokenizedSource:
    """Tokenise validated rows as they are read; no usable row at all is an error."""
    prompts, results = [], []
    for ex, result in tokenize_stream(examples, tokenizer, cfg):
        prompts.append(ex.prompt)
        results.append(result)
    if not results:
        raise no_usable_rows(report)
    return TokenizedSource(prompts, results, report)


# ---------------------------------------------------------------- the key

def _blake() -> Any:
    return hashlib.blake2b(digest_size=DIGEST)


def files_digest(source: Any) -> str | None:
    """Digest of a local source's files (names within it, sizes, bytes); None if not local."""
    if not isinstance(source, (str, Path)):
        return None
    path = Path(source).expanduser()
    if path.is_file():
        files, base = [path], path.parent
    elif path.is_dir():
        files, base = sorted(p for p in path.rglob("*") if p.is_file()), path
    else:
        return None
    h = _blake()
    for f in files:
        h.update(f"{f.relative_to(base)}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def rows_digest(examples: list[PreferenceExample]) -> str:
    """Digest of validated rows (a source that is not a local file)."""
    h = _blake()
    for ex in examples:
        h.update(json.dumps([ex.prompt, ex.responses, ex.kind, ex.source, ex.row]).encode())
    return h.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str | None:
    """Digest of everything about a tokenizer that can change tokens or renderings; None for a
    tokenizer without a fast backend (never cached). Truncation and padding are left out: the
    tokenizer call sets them each time."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    if backend.truncation is not None or backend.padding is not None:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(backend.to_str())  # a copy, without them
        backend.no_truncation()
        backend.no_padding()
    extra = {"class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
             "chat_template": getattr(tokenizer, "chat_template", None),
             "special_tokens": tokenizer.special_tokens_map,
             "all_special_tokens": list(getattr(tokenizer, "all_special_tokens", [])),
             "ids": [tokenizer.bos_token_id, tokenizer.eos_token_id],
             "split_special_tokens": getattr(tokenizer, "split_special_tokens", None)}
    h = _blake()
    h.update(backend.to_str().encode())
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def code_digest() -> str:
    """Digest of the softpo modules an entry depends on, and the tokenizing libraries' versions."""
    import tokenizers
    import transformers

    h = _blake()
    h.update(f"{FORMAT} {transformers.__version__} {tokenizers.__version__}".encode())
    here = Path(__file__).resolve().parent
    for module in CODE:
        h.update((here / f"{module}.py").read_bytes())
    return h.hexdigest()


def entry_key(data: str, name: str, split: str, tokenizer: str, cfg: DataConfig) -> str:
    """The entry's file name: a digest of the data, tokenizer, settings and code."""
    parts = {"data": data, "name": name, "split": split, "tokenizer": tokenizer,
             "settings": {k: getattr(cfg, k) for k in SETTINGS}, "code": code_digest()}
    h = _blake()
    h.update(json.dumps(parts, sort_keys=True).encode())
    return h.hexdigest()


# ---------------------------------------------------------------- writing

ORDER = ("rows", "text_spans", "info", "spans", "tokens", "text")  # in the file; keeps alignment
DTYPES = {"int64": "I64", "int32": "I32", "uint16": "U16", "uint8": "U8"}


def _raw(prompt: Text) -> bytes:
    """A prompt as stored: the string, or a conversation as JSON."""
    return (prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)).encode()


def _shown(prompt: Text, r: TokenizedExample) -> bytes | None:
    """The rendered prompt as stored: None when it is the prompt string itself."""
    return None if r.prompt_text is prompt else r.prompt_text.encode()


def _flags(r: TokenizedExample) -> int:
    return (TRUNCATED_PROMPT * r.truncated_prompt + TRUNCATED_RESPONSE * r.truncated_response
            + FALLBACK * r.template_fallback)


@dataclass
class _Plan:
    """An entry before it is written: the per-row arrays, the sizes of the streamed ones (tokens,
    text) and the metadata."""

    small: dict[str, np.ndarray]
    sizes: dict[str, tuple[str, int]]  # name -> (dtype, elements), for every array
    meta: dict[str, str]


def _plan(src: TokenizedSource) -> _Plan:
    """The first pass over the rows: everything but the tokens and texts themselves."""
    sources: dict[str, int] = {}
    kinds: dict[str, int] = {}
    info, spans, text_spans, bad, rows, top = [], [], [], [], [], 0
    for i, (prompt, r) in enumerate(zip(src.prompts, src.results)):
        chat = CHAT * (not isinstance(prompt, str))
        rows.append(r.row or 0)
        if isinstance(r, BadRowError):
            bad.append([i, r.detail, r.reason, r.field])
            info.append([sources.setdefault(r.source or "", len(sources)), -1, -1, chat])
            text_spans.append([len(_raw(prompt)), -1])
            continue
        shown = _shown(prompt, r)
        text_spans.append([len(_raw(prompt)), -1 if shown is None else len(shown)])
        info.append([sources.setdefault(r.source, len(sources)),
                     kinds.setdefault(r.kind, len(kinds)), len(r.response_ids), _flags(r) + chat])
        spans += [len(r.prompt_ids), *map(len, r.response_ids)]
        top = max(top, max(chain(r.prompt_ids, *r.response_ids), default=0))
    small = {"rows": np.array(rows, np.int64),
             "text_spans": np.array(text_spans, np.int64).reshape(-1, 2),  # (N, 2)
             "info": np.array(info, np.int32).reshape(-1, 4),  # (N, 4)
             "spans": np.array(spans, np.int32)}
    sizes = {k: (a.dtype.name, a.size) for k, a in small.items()}
    sizes["tokens"] = ("uint16" if top < 1 << 16 else "int32", sum(spans))
    sizes["text"] = ("uint8", int(small["text_spans"].clip(0).sum()))
    meta = {"report": src.report.to_json(), "sources": json.dumps(list(sources)),
            "kinds": json.dumps(list(kinds)), "bad": json.dumps(bad), "top": str(top)}
    return _Plan(small, sizes, meta)


def _blocks(src: TokenizedSource, plan: _Plan) -> Iterator[bytes]:
    """The second pass: the data region of the file, array by array in ORDER, a chunk of rows at
    a time (the tokens and texts are never all in memory twice)."""
    for name in ORDER[:4]:
        yield plan.small[name].tobytes()
    ok = [r for r in src.results if not isinstance(r, BadRowError)]
    dtype = plan.sizes["tokens"][0]
    for i in range(0, len(ok), ROWS_PER_READ):
        lists = [ids for r in ok[i:i + ROWS_PER_READ]
                 for ids in chain((r.prompt_ids,), r.response_ids)]
        yield np.fromiter(chain.from_iterable(lists), dtype=dtype,
                          count=sum(map(len, lists))).tobytes()
    for i in range(0, len(src.results), ROWS_PER_READ):
        part = []
        for prompt, r in zip(src.prompts[i:i + ROWS_PER_READ], src.results[i:i + ROWS_PER_READ]):
            part.append(_raw(prompt))
            if not isinstance(r, BadRowError):
                part.append(_shown(prompt, r) or b"")
        yield b"".join(part)


def _header(plan: _Plan, meta: dict[str, str]) -> bytes:
    """The safetensors header: its length (u64 little-endian), then JSON padded to 8 bytes."""
    head, at = {}, 0
    for name in ORDER:
        dtype, count = plan.sizes[name]
        shape = list(plan.small[name].shape) if name in plan.small else [count]
        end = at + count * np.dtype(dtype).itemsize
        head[name] = {"dtype": DTYPES[dtype], "shape": shape, "data_offsets": [at, end]}
        at = end
    text = json.dumps({"__metadata__": meta, **head}).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _meta_digest(meta: dict[str, str]) -> Any:
    h = _blake()
    h.update(json.dumps({k: v for k, v in meta.items() if k != "digest"}, sort_keys=True).encode())
    return h


def write_entry(path: Path, src: TokenizedSource, about: dict[str, str]) -> None:
    """Write `src` to `path` as safetensors, streamed, atomically (a temporary file renamed);
    the header's digest covers the metadata and every byte of the data."""
    plan = _plan(src)
    meta = {**plan.meta, **{k: str(v) for k, v in about.items()}, "format": str(FORMAT),
            "digest": "0" * 2 * DIGEST}
    h = _meta_digest(meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(_header(plan, meta))
            for block in _blocks(src, plan):
                h.update(block)
                f.write(block)
            meta["digest"] = h.hexdigest()  # as long as the placeholder: the header keeps its size
            f.seek(0)
            f.write(_header(plan, meta))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- reading

def _verified_meta(path: Path) -> dict[str, str] | None:
    """The entry's metadata if the file is whole: format, size and digest checked."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        meta = header.pop("__metadata__")
        end = max(v["data_offsets"][1] for v in header.values())
        if meta.get("format") != str(FORMAT) or os.fstat(f.fileno()).st_size != 8 + n + end:
            return None
        h = _meta_digest(meta)
        while block := f.read(1 << 22):
            h.update(block)
    return meta if h.hexdigest() == meta.get("digest") else None


def read_entry(path: Path, tokenizer: Any) -> TokenizedSource | None:
    """The entry at `path`, or None when there is none or it is damaged (it is then rebuilt)."""
    if not path.is_file():
        return None
    try:
        meta = _verified_meta(path)
        report = DataReport.from_json(meta["report"]) if meta else None
    except Exception:  # a truncated or overwritten file: struct, json and os raise many types
        return None
    if report is None:
        return None
    src = _Reader(path, meta).read(report)
    if any(isinstance(r, TokenizedExample) and r.template_fallback for r in src.results):
        warn_template_fallback(tokenizer)
    return src


class _Reader:
    """Rebuilds an entry's rows, `ROWS_PER_READ` rows at a time: their tokens become lists of
    shared ints (`collate.intern_ids`) through one numpy indexing of an object table."""

    def __init__(self, path: Path, meta: dict[str, str]):
        self.path, self.meta = path, meta
        self.sources, self.kinds = json.loads(meta["sources"]), json.loads(meta["kinds"])
        self.bad = {i: rest for i, *rest in json.loads(meta["bad"])}  # row -> (detail, reason, field)
        top = int(meta["top"])
        self.table = np.empty(top + 1, dtype=object)  # (top + 1,) the shared ints
        self.table[:] = shared_ints(top)

    def read(self, report: DataReport) -> TokenizedSource:
        from safetensors import safe_open

        out = TokenizedSource([], [], report)
        with safe_open(str(self.path), framework="np") as f:
            rows, tspans, info, spans = (f.get_tensor(k).tolist() for k in ORDER[:4])
            tokens, text = f.get_slice("tokens"), f.get_slice("text")
            s = at = t = 0  # offsets into spans, tokens and text
            for i0 in range(0, len(rows), ROWS_PER_READ):
                i1 = min(i0 + ROWS_PER_READ, len(rows))
                n_spans = sum(1 + n for _, _, n, _ in info[i0:i1] if n >= 0)
                n_tokens = sum(spans[s:s + n_spans])
                n_text = sum(raw + max(shown, 0) for raw, shown in tspans[i0:i1])
                flat = self.table[_part(tokens, at, n_tokens)].tolist()
                blob = _part(text, t, n_text).tobytes()
                self._rows(out, range(i0, i1), (rows, info, tspans), spans[s:s + n_spans], flat,
                           blob)
                s, at, t = s + n_spans, at + n_tokens, t + n_text
        return out

    def _rows(self, out: TokenizedSource, which: range, per_row: tuple, spans: list[int],
              flat: list[int], blob: bytes) -> None:
        rows, info, tspans = per_row
        o = p = k = 0  # offsets into flat, blob and spans
        for i in which:
            (source, kind, n, flags), (raw_len, shown_len) = info[i], tspans[i]
            raw = blob[p:p + raw_len].decode()
            p += raw_len
            prompt = json.loads(raw) if flags & CHAT else raw
            out.prompts.append(prompt)
            if n < 0:
                detail, reason, field = self.bad[i]
                out.results.append(BadRowError(detail, reason=reason, source=self.sources[source],
                                               row=rows[i], field=field))
                continue
            shown = prompt if shown_len < 0 else blob[p:p + shown_len].decode()
            p += max(shown_len, 0)
            ids = []
            for length in spans[k:k + 1 + n]:
                ids.append(flat[o:o + length])
                o += length
            k += 1 + n
            out.results.append(TokenizedExample(
                ids[0], ids[1:], self.kinds[kind], self.sources[source], rows[i], shown,
                bool(flags & TRUNCATED_PROMPT), bool(flags & TRUNCATED_RESPONSE),
                bool(flags & FALLBACK)))


def _part(array: Any, start: int, count: int) -> np.ndarray:
    """`count` elements of a safetensors slice from `start` (an empty slice cannot be indexed)."""
    return array[start:start + count] if count else np.zeros(0, dtype=np.int64)
