"""Reading rows: files, folders and hub datasets -> (1-based row, record) streams.

Sources (`open_source(source, split)`)
--------------------------------------
* `.jsonl` (streamed line by line; row = 1-based line, blank lines allowed), `.json` (a list of
  objects or `{"data": [...]}`; row = 1-based record), `.csv` (row = the 1-based line where the
  record starts, the header being line 1; list-valued cells such as `responses`, `ranking` or a
  conversation are JSON text), `.parquet` (row = 1-based record);
* a local folder: the output of `datasets.save_to_disk` (read with `load_from_disk`), or a folder of
  data files (those whose name contains the split if any do, else all), read with the readers above;
* a hub dataset `name` or `name:split` through `datasets.load_dataset` (row = 1-based record);
* in memory (the Python API): a `datasets.Dataset` or `DatasetDict`, or a list of dicts (row =
  1-based record), named in messages by the caller (e.g. `train_dataset`).

A reader never validates fields (that is `softpo.data`); it yields each record, or a `BadRowError` in
its place for a line that is not valid UTF-8, not valid JSON, not an object, or a ragged CSV row, so
that `on_bad_rows="skip"` can count it. Problems with a whole file (missing, unknown type, not valid
JSON/CSV/Parquet, a missing split) raise `UserError` at once.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from softpo.errors import UserError

KNOWN_FIELDS = ("prompt", "chosen", "rejected", "responses", "best", "ranking", "scores")


class BadRowError(UserError):
    """A `UserError` about one row; `reason` is the key it is counted under when rows are skipped."""

    def __init__(self, message: str, *, reason: str, source: str | None = None,
                 row: int | None = None, field: str | None = None):
        super().__init__(message, source=source, row=row, field=field)
        self.reason = reason


def _type_name(v: Any) -> str:
    names = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string",
             list: "list", dict: "object"}
    return names.get(type(v), type(v).__name__)


class RowSource(NamedTuple):
    """One source's rows: its name, its columns (tabular sources) and the numbered records."""

    name: str  # shown in messages
    columns: list[str] | None  # tabular sources: the column names (kind told once from them)
    rows: Iterator[tuple[int, Any]]  # (1-based row, record or BadRowError)
    header_row: int | None = None  # CSV: line 1 (the header) for column errors


def _decode(raw: bytes, name: str, line: int) -> str | BadRowError:
    try:
        return raw.decode("utf-8-sig" if line == 1 else "utf-8")
    except UnicodeDecodeError as e:
        col = len(raw[:e.start].decode("utf-8", "replace")) + 1
        field_ = None
        try:  # name the field holding the bad bytes when the rest of the line parses
            rec = json.loads(raw.decode("utf-8", "replace"))
            field_ = next((k for k, v in rec.items() if "\ufffd" in json.dumps(v, ensure_ascii=False)),
                          None) if isinstance(rec, dict) else None
        except ValueError:
            pass
        return BadRowError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {col}); save the "
                           "file as UTF-8", reason="not_utf8", source=name, row=line, field=field_)


def _jsonl_rows(path: Path, name: str) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as f:
        for line, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            text = _decode(raw, name, line)
            if isinstance(text, BadRowError):
                yield line, text
                continue
            try:
                rec = json.loads(text.rstrip("\r\n"))  # an error at the end is on this line
            except json.JSONDecodeError as e:
                yield line, BadRowError(f"not valid JSON ({e.msg} at column {e.colno})",
                                        reason="malformed_json", source=name, row=line)
                continue
            yield line, rec if isinstance(rec, dict) else BadRowError(
                f"a row must be a JSON object, got {_type_name(rec)}", reason="wrong_type",
                source=name, row=line)


def read_jsonl(path: Path, name: str) -> RowSource:
    """JSON Lines, streamed; row = 1-based line."""
    return RowSource(name, None, _jsonl_rows(path, name))


def read_json(path: Path, name: str) -> RowSource:
    """A JSON list of objects (or `{"data": [...]}`); row = 1-based record."""
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise UserError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x})", source=name,
                        row=raw[:e.start].count(b"\n") + 1) from None
    except json.JSONDecodeError as e:
        hint = "; one object per line is JSON Lines: name the file .jsonl" \
            if e.msg == "Extra data" else ""
        raise UserError(f"not valid JSON ({e.msg} at column {e.colno}){hint}", source=name,
                        row=e.lineno) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise UserError('expected a list of objects or {"data": [...]}', source=name)
    return RowSource(name, None, ((i, rec if isinstance(rec, dict) else BadRowError(
        f"a record must be an object, got {_type_name(rec)}", reason="wrong_type", source=name,
        row=i)) for i, rec in enumerate(data, 1)))


def _csv_cell(key: str, text: str) -> Any:
    """CSV cells are text; list-valued fields and conversations are JSON text, `best` an integer."""
    stripped = text.strip()
    if key == "best" and stripped.lstrip("-").isdigit():
        return int(stripped)
    if key in ("responses", "ranking", "scores") or (key in KNOWN_FIELDS and stripped[:2] == "[{"):
        try:
            value = json.loads(stripped)
            if key in ("responses", "ranking", "scores") or (
                    isinstance(value, list) and all(isinstance(m, dict) for m in value)):
                return value
        except ValueError:
            pass
    return text


def read_csv(path: Path, name: str) -> RowSource:
    """CSV with a header; row = the line where the record starts."""
    bad_lines: dict[int, BadRowError] = {}

    def lines() -> Iterator[str]:
        with open(path, "rb") as f:
            for line, raw in enumerate(f, 1):
                text = _decode(raw, name, line)
                if isinstance(text, BadRowError):
                    bad_lines[line] = text
                    text = raw.decode("utf-8", "replace")
                yield text

    reader = csv.reader(lines())
    try:
        header = [h.strip() for h in next(reader, [])]
    except csv.Error as e:
        raise UserError(f"not valid CSV ({e})", source=name, row=reader.line_num) from None

    def rows() -> Iterator[tuple[int, Any]]:
        start = reader.line_num + 1
        while True:
            try:
                cells = next(reader, None)
            except csv.Error as e:
                raise UserError(f"not valid CSV ({e})", source=name, row=reader.line_num) from None
            if cells is None:
                return
            row, start = start, reader.line_num + 1
            if not any(c.strip() for c in cells):
                continue
            record = dict(zip(header, cells))
            bad = next((bad_lines[i] for i in range(row, start) if i in bad_lines), None)
            if bad is not None:
                field_ = next((k for k, v in record.items() if "\ufffd" in v), None)
                yield row, BadRowError(bad.detail, reason="not_utf8", source=name, row=row,
                                       field=field_)
            elif len(cells) != len(header):
                missing = header[len(cells)] if len(cells) < len(header) else None
                yield row, BadRowError(f"has {len(cells)} cells but the header has {len(header)} "
                                       "columns", reason="bad_csv_row", source=name, row=row,
                                       field=missing)
            else:
                yield row, {k: _csv_cell(k, v) for k, v in record.items()}

    return RowSource(name, header if header else None, rows(), header_row=1)


def read_parquet(path: Path, name: str) -> RowSource:
    """Parquet, in record batches; row = 1-based record."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise UserError(f"not a valid Parquet file ({type(e).__name__}: {e})", source=name) from None

    def rows() -> Iterator[tuple[int, Any]]:
        i = 0
        for batch in pf.iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                i += 1
                yield i, rec

    return RowSource(name, list(pf.schema_arrow.names), rows())


READERS = {".jsonl": read_jsonl, ".ndjson": read_jsonl, ".json": read_json, ".csv": read_csv,
           ".parquet": read_parquet}


def _hf_source(ds: Any, name: str) -> RowSource:
    return RowSource(name, list(ds.column_names), ((i, rec) for i, rec in enumerate(ds, 1)))


def _folder_sources(path: Path, name: str, split: str) -> list[RowSource]:
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise UserError(f"no split '{split}' (splits: {', '.join(ds)})", source=name)
            ds = ds[split]
        return [_hf_source(ds, name)]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in READERS)
    files = [p for p in files if split in p.name] or files
    if not files:
        raise UserError(f"folder holds no data files ({', '.join(READERS)}) and no saved dataset",
                        source=name)
    return [READERS[p.suffix.lower()](p, str(p)) for p in files]


def _hub_source(source: str, split: str) -> RowSource:
    import datasets

    hub_name, sep, named_split = source.partition(":")
    split = named_split if sep else split
    try:
        ds = datasets.load_dataset(hub_name, split=split)
    except Exception as e:  # datasets raises many types (connection, missing split, bad config)
        offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                      for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
        hint = "; offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and it is not in the " \
            "local cache" if offline else ""
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot load hub dataset '{hub_name}' split '{split}': {reason}{hint}",
                        source=source) from None
    return _hf_source(ds, source)


def _record_source(records: list | tuple, name: str) -> RowSource:
    return RowSource(name, None, ((i, rec if isinstance(rec, dict) else BadRowError(
        f"a record must be an object, got {_type_name(rec)}", reason="wrong_type", source=name,
        row=i)) for i, rec in enumerate(records, 1)))


def _in_memory(source: Any, split: str, name: str) -> RowSource | None:
    """A list of dicts or a `datasets` object as a row source; None for anything else."""
    if isinstance(source, (list, tuple)):
        return _record_source(source, name)
    if not type(source).__module__.startswith("datasets"):
        return None
    if isinstance(source, dict):  # a DatasetDict
        if split not in source:
            raise UserError(f"no split '{split}' (splits: {', '.join(source)})", source=name)
        source = source[split]
    return _hf_source(source, name)


def open_source(source: Any, split: str = "train", name: str | None = None) -> list[RowSource]:
    """The row sources behind a path or hub name (several for a folder of files), or behind an
    in-memory dataset or list of dicts (`name` names it in messages)."""
    memory = _in_memory(source, split, name or "rows")
    if memory is not None:
        return [memory]
    source = str(source)
    path = Path(source).expanduser()
    if path.is_file():
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            raise UserError(f"unknown file type '{path.suffix}' (known: {', '.join(READERS)})",
                            source=source)
        return [reader(path, source)]
    if path.is_dir():
        return _folder_sources(path, source, split)
    if path.suffix.lower() in READERS or source.startswith((".", "/", "~")):
        raise UserError("file not found", source=source)
    return [_hub_source(source, split)]
