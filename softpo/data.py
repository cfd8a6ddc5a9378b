"""Preference data: telling each row's kind and validating it with row-numbered errors.

Rows come from `softpo.readers` (JSONL/JSON/CSV/Parquet files, folders, hub datasets, or in
memory: a `datasets.Dataset` or a list of dicts); `load_preferences(source, cfg)` reads and
validates a whole source.

Row kinds (told per file from its fields; every row of a file must be of the same kind)
-----------------------------------------------------------------------------------
* `pairs`      `{prompt, chosen, rejected}`, or `{chosen, rejected}` with an implicit prompt: for
               conversations the longest shared prefix of messages; for strings the longest shared
               prefix cut back to a whitespace boundary (the whitespace starts the responses).
* `best_of_n`  `{prompt, responses, best}`: `best` is the index of the winner.
* `ranked`     `{prompt, responses, ranking}`: a permutation of the indices, best first; or
               `{prompt, responses, scores}`: higher is better, ties are an error.
Texts are strings or conversations (lists of `{role, content}` messages, roles in `ROLES`). If either
side of a row is a conversation the whole row is: a string prompt becomes one user message, a string
response one assistant message, and responses that repeat the prompt messages have them removed.

Every row becomes a `PreferenceExample` whose responses are in *preference order* (index 0 is the
most preferred; best-of-n: the winner, then the others in file order), the convention of
`softpo.losses`. A bad row raises `BadRowError` (a `UserError` naming file, row and field) or, with
`on_bad_rows="skip"`, is counted in the `DataReport`. Problems with a whole file (missing, empty,
unreadable, a CSV header without a needed column) are always errors.

Tokenisation and collation are the next step, `softpo.collate`.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import statistics
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator, NoReturn

from softpo.config import DataConfig
from softpo.errors import UserError
from softpo.readers import KNOWN_FIELDS, BadRowError, _decode, _type_name, open_source

ROLES = ("system", "user", "assistant", "tool")
MAX_MESSAGES = 5  # bad-row messages kept in a report
Text = str | list[dict[str, str]]  # a string, or a conversation of {role, content} messages


@dataclass(frozen=True)
class PreferenceExample:
    """One prompt with >= 2 responses in preference order (index 0 most preferred)."""

    prompt: Text
    responses: list[Text]
    source: str = ""
    row: int = 0  # 1-based line (JSONL/CSV) or record number
    kind: str = "pairs"  # "pairs" | "best_of_n" | "ranked"

    @property
    def is_chat(self) -> bool:
        """Whether the example is a conversation."""
        return isinstance(self.prompt, list)


@dataclass
class DataReport:
    """What reading (and tokenising) a source did: counts, skipped rows, truncation, lengths."""

    source: str
    kind: str | None = None
    rows_read: int = 0
    rows_kept: int = 0
    chat_rows: int = 0
    bad_rows: Counter = field(default_factory=Counter)  # reason -> count
    messages: list[str] = field(default_factory=list)  # the first MAX_MESSAGES bad-row messages
    responses_per_row: Counter = field(default_factory=Counter)  # n -> rows
    rows_truncated_prompt: int = 0
    rows_truncated_response: int = 0
    rows_template_fallback: int = 0  # chat rows tokenised without the template's turn rendering
    prompt_tokens: list[int] = field(default_factory=list)  # per kept row, after truncation
    response_tokens: list[int] = field(default_factory=list)  # per response, after truncation

    @property
    def num_bad(self) -> int:
        """Bad rows seen, all reasons together."""
        return sum(self.bad_rows.values())

    def add_bad(self, error: BadRowError) -> None:
        """Count a bad row (and keep its message among the first few)."""
        self.bad_rows[error.reason] += 1
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(str(error))

    def add_example(self, ex: PreferenceExample) -> None:
        """Count a kept row."""
        self.kind = self.kind or ex.kind
        self.rows_kept += 1
        self.chat_rows += ex.is_chat
        self.responses_per_row[len(ex.responses)] += 1

    def to_json(self) -> str:
        """Every count and list as JSON (`from_json` reads it back)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        return json.dumps({**d, "responses_per_row": sorted(self.responses_per_row.items())})

    @classmethod
    def from_json(cls, text: str) -> "DataReport":
        """The report `to_json` wrote."""
        d = json.loads(text)
        return cls(**{**d, "bad_rows": Counter(d["bad_rows"]),
                      "responses_per_row": Counter(dict(d["responses_per_row"]))})

    def summary(self) -> str:
        """The report as the lines printed when training starts and by `softpo data check`."""
        per_row = ", ".join(f"{n} x{c}" for n, c in sorted(self.responses_per_row.items()))
        lines = [f"{self.source}: {self.kind}, {self.rows_read} rows read, {self.rows_kept} kept, "
                 f"{self.num_bad} bad; responses per row: {per_row or '-'}; "
                 f"{self.chat_rows} conversational"]
        for name, values in (("prompt", self.prompt_tokens), ("response", self.response_tokens)):
            if values:
                lines.append(f"  {name} tokens: {length_stats(values)}")
        if self.prompt_tokens:
            lines.append(f"  truncated: {self.rows_truncated_prompt} rows' prompts, "
                         f"{self.rows_truncated_response} rows' responses")
        if self.rows_template_fallback:
            lines.append(f"  chat template fallback: {self.rows_template_fallback} rows")
        if self.bad_rows:
            reasons = ", ".join(f"{r} {c}" for r, c in self.bad_rows.most_common())
            lines += [f"  skipped rows: {reasons}"] + [f"    {m}" for m in self.messages]
        return "\n".join(lines)


def length_stats(values: list[int]) -> str:
    """min / median / p95 (nearest rank) / max."""
    s = sorted(values)
    p95 = s[max(0, math.ceil(0.95 * len(s)) - 1)]
    return f"min {s[0]}  median {statistics.median(s):g}  p95 {p95}  max {s[-1]}"


# ---------------------------------------------------------------- validating one row

@dataclass
class _Ctx:
    source: str
    row: int | None

    def fail(self, reason: str, field: str | None, message: str) -> NoReturn:
        raise BadRowError(message, reason=reason, source=self.source, row=self.row, field=field)




def _close(keys: Any, name: str) -> str | None:
    """An unknown key that looks like a misspelling of `name`."""
    unknown = [k for k in keys if isinstance(k, str) and k not in KNOWN_FIELDS]
    same_case = [k for k in unknown if k.lower().strip() == name]
    close = same_case or difflib.get_close_matches(name, unknown, n=1, cutoff=0.7)
    return close[0] if close else None


def _require(ctx: _Ctx, keys: Any, name: str) -> None:
    if name not in keys:
        guess = _close(keys, name)
        ctx.fail("missing_field", name, f"missing (did you mean '{guess}'?)" if guess else "missing")


def detect_kind(keys: Any, ctx: _Ctx) -> str:
    """The row kind its field names imply; misspelt or missing fields are errors."""
    keys = set(keys)
    if "responses" in keys:
        given = [k for k in ("best", "ranking", "scores") if k in keys]
        if len(given) > 1:
            ctx.fail("ambiguous_fields", given[1], f"give only one of 'best', 'ranking' or 'scores' "
                     f"(found {', '.join(given)})")
        if not given:
            guess = next(filter(None, (_close(keys, k) for k in ("best", "ranking", "scores"))), None)
            hint = f" (did you mean '{guess}'?)" if guess else ""
            ctx.fail("missing_field", "best", "missing: a row with 'responses' needs 'best' "
                     f"(best-of-n) or 'ranking' or 'scores' (ranked){hint}")
        _require(ctx, keys, "prompt")
        return "best_of_n" if given == ["best"] else "ranked"
    if "chosen" in keys or "rejected" in keys:
        _require(ctx, keys, "chosen")
        _require(ctx, keys, "rejected")
        if "prompt" not in keys and (guess := _close(keys, "prompt")):
            ctx.fail("missing_field", "prompt", f"missing (did you mean '{guess}'?)")
        return "pairs"
    for name in ("chosen", "rejected", "responses"):
        if guess := _close(keys, name):
            ctx.fail("missing_field", name, f"missing (did you mean '{guess}'?)")
    ctx.fail("unknown_kind", None, f"cannot tell the row kind from its fields "
             f"({', '.join(sorted(map(str, keys))) or 'none'}): expected prompt+chosen+rejected, "
             "chosen+rejected, prompt+responses+best or prompt+responses+ranking|scores")


def _text(ctx: _Ctx, value: Any, name: str) -> Text:
    if isinstance(value, str):
        if not value.strip():
            ctx.fail("empty_text", name, "is whitespace only" if value else "is empty")
        return value
    if isinstance(value, list):
        if not value:
            ctx.fail("empty_text", name, "is an empty conversation")
        return [_message(ctx, m, f"{name}[{i}]") for i, m in enumerate(value)]
    ctx.fail("wrong_type", name, "must be a string or a list of {role, content} messages, "
             f"got {_type_name(value)}")


def _message(ctx: _Ctx, m: Any, name: str) -> dict[str, str]:
    if not isinstance(m, dict):
        ctx.fail("bad_message", name, f"a message must be an object with 'role' and 'content', "
                 f"got {_type_name(m)}")
    for key in ("role", "content"):
        if key not in m:
            guess = difflib.get_close_matches(key, [str(k) for k in m], n=1, cutoff=0.7)
            ctx.fail("bad_message", f"{name}.{key}",
                     f"missing (did you mean '{guess[0]}'?)" if guess else
                     "missing (a message is {role, content})")
    if m["role"] not in ROLES:
        ctx.fail("bad_message", f"{name}.role", f"unknown role {m['role']!r} "
                 f"(expected one of {', '.join(ROLES)})")
    content = m["content"]
    if not isinstance(content, str):
        ctx.fail("wrong_type", f"{name}.content", f"must be a string, got {_type_name(content)}")
    if not content.strip():
        ctx.fail("empty_text", f"{name}.content", "is whitespace only" if content else "is empty")
    return {"role": m["role"], "content": content}


def _unify(ctx: _Ctx, prompt: Text, responses: list[Text], names: list[str]) -> tuple[Text, list]:
    """Make a row all strings or all conversations; drop prompt messages repeated in responses."""
    if isinstance(prompt, str) and all(isinstance(r, str) for r in responses):
        return prompt, responses
    prompt = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    responses = [r if isinstance(r, list) else [{"role": "assistant", "content": r}]
                 for r in responses]
    k = len(prompt)
    if all(len(r) > k and r[:k] == prompt for r in responses):  # e.g. UltraFeedback-style rows
        responses = [r[k:] for r in responses]
    else:
        k = 0
    for r, name in zip(responses, names):
        if r[0]["role"] != "assistant":
            ctx.fail("bad_message", f"{name}[{k}].role", "a response must start with an assistant "
                     f"message, got {r[0]['role']!r}")
    return prompt, responses


def _shared_prefix(ctx: _Ctx, chosen: Text, rejected: Text) -> tuple[Text, list[Text]]:
    """Implicit prompt: the longest shared prefix (of messages, or of text up to whitespace)."""
    if isinstance(chosen, str) != isinstance(rejected, str):
        ctx.fail("wrong_type", "rejected", "must be a string if 'chosen' is one, and a "
                 "conversation if 'chosen' is one")
    if isinstance(chosen, str):
        p = len(os.path.commonprefix([chosen, rejected]))
        at_space = lambda s, k: k == len(s) or s[k].isspace()  # noqa: E731
        cut = next((k for k in range(p, 0, -1) if at_space(chosen, k) and at_space(rejected, k)), 0)
    else:
        cut = next((k for k, (a, b) in enumerate(zip(chosen, rejected)) if a != b),
                   min(len(chosen), len(rejected)))
    prompt, responses = chosen[:cut], [chosen[cut:], rejected[cut:]]
    if not cut or (isinstance(prompt, str) and not prompt.strip()):
        ctx.fail("no_shared_prompt", "prompt", "missing, and 'chosen' and 'rejected' share no "
                 "leading text or messages to use as the prompt")
    for name, r in zip(("chosen", "rejected"), responses):
        if not r or (isinstance(r, str) and not r.strip()):
            ctx.fail("empty_text", name, "is empty once the prompt it shares with the other "
                     "response is removed")
    return _unify(ctx, prompt, responses, ["chosen", "rejected"])


def _pairs(ctx: _Ctx, rec: dict) -> tuple[Text, list[Text]]:
    chosen, rejected = _text(ctx, rec["chosen"], "chosen"), _text(ctx, rec["rejected"], "rejected")
    if chosen == rejected:
        ctx.fail("identical_responses", "rejected", "is identical to 'chosen'")
    if "prompt" not in rec:
        return _shared_prefix(ctx, chosen, rejected)
    prompt, responses = _unify(ctx, _text(ctx, rec["prompt"], "prompt"), [chosen, rejected],
                               ["chosen", "rejected"])
    if responses[0] == responses[1]:
        ctx.fail("identical_responses", "rejected", "is identical to 'chosen' once the prompt is "
                 "removed")
    return prompt, responses


def _response_list(ctx: _Ctx, rec: dict) -> tuple[Text, list[Text]]:
    raw = rec["responses"]
    if not isinstance(raw, list):
        ctx.fail("wrong_type", "responses", f"must be a list of responses, got {_type_name(raw)}")
    if len(raw) < 2:
        ctx.fail("too_few_responses", "responses", f"has {len(raw)} response(s); at least 2 needed")
    names = [f"responses[{i}]" for i in range(len(raw))]
    responses = [_text(ctx, r, name) for r, name in zip(raw, names)]
    return _unify(ctx, _text(ctx, rec["prompt"], "prompt"), responses, names)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _best_of_n(ctx: _Ctx, rec: dict) -> tuple[Text, list[Text]]:
    prompt, responses = _response_list(ctx, rec)
    best, n = rec["best"], len(responses)
    if not _is_int(best):
        ctx.fail("wrong_type", "best", f"must be an integer index, got {_type_name(best)} {best!r}")
    if not 0 <= best < n:
        ctx.fail("best_out_of_range", "best", f"{best} is out of range for {n} responses "
                 f"(indices 0..{n - 1})")
    for i, r in enumerate(responses):
        if i != best and r == responses[best]:
            ctx.fail("identical_responses", f"responses[{i}]", f"is identical to the best "
                     f"response responses[{best}]")
    return prompt, [responses[best]] + [r for i, r in enumerate(responses) if i != best]


def _ranking(ctx: _Ctx, ranking: Any, n: int) -> list[int]:
    if not isinstance(ranking, list) or not all(_is_int(i) for i in ranking):
        ctx.fail("wrong_type", "ranking", f"must be a list of integer indices, got {ranking!r}")
    if sorted(ranking) != list(range(n)):
        missing = sorted(set(range(n)) - set(ranking))
        extra = sorted({i for i in ranking if ranking.count(i) > 1 or not 0 <= i < n})
        ctx.fail("bad_ranking", "ranking", f"{ranking} is not a permutation of 0..{n - 1} "
                 f"(missing {missing}, repeated or out of range {extra})")
    return ranking


def _order_from_scores(ctx: _Ctx, scores: Any, n: int) -> list[int]:
    ok = isinstance(scores, list) and all(isinstance(s, (int, float)) and not isinstance(s, bool)
                                          and math.isfinite(s) for s in scores)
    if not ok:
        ctx.fail("wrong_type", "scores", f"must be a list of finite numbers, got {scores!r}")
    if len(scores) != n:
        ctx.fail("wrong_type", "scores", f"has {len(scores)} scores for {n} responses")
    for i in range(n):
        for j in range(i + 1, n):
            if scores[i] == scores[j]:
                ctx.fail("tied_scores", "scores", f"responses {i} and {j} tie at {scores[i]}; "
                         "scores must order the responses strictly")
    return sorted(range(n), key=lambda i: -scores[i])


def _ranked(ctx: _Ctx, rec: dict) -> tuple[Text, list[Text]]:
    prompt, responses = _response_list(ctx, rec)
    n = len(responses)
    order = _ranking(ctx, rec["ranking"], n) if "ranking" in rec else \
        _order_from_scores(ctx, rec["scores"], n)
    for k, i in enumerate(order):
        for j in order[:k]:
            if responses[i] == responses[j]:
                ctx.fail("identical_responses", f"responses[{i}]", f"is identical to "
                         f"responses[{j}] but ranked differently")
    return prompt, [responses[i] for i in order]


NORMALISERS = {"pairs": _pairs, "best_of_n": _best_of_n, "ranked": _ranked}


def to_example(record: dict, source: str, row: int | None, kind: str | None = None,
               file_kind: str | None = None) -> PreferenceExample:
    """Validate one record and put its responses in preference order."""
    ctx = _Ctx(source, row)
    kind = kind or detect_kind(record, ctx)
    if file_kind and kind != file_kind:
        ctx.fail("mixed_kinds", None, f"row is {kind} but earlier rows are {file_kind}; "
                 "a source holds one kind of row")
    prompt, responses = NORMALISERS[kind](ctx, record)
    return PreferenceExample(prompt, responses, source, row or 0, kind)


# ---------------------------------------------------------------- loading

def iter_preferences(source: Any, split: str, report: DataReport,
                     skip: bool = False) -> Iterator[PreferenceExample]:
    """Stream validated examples; bad rows raise, or with `skip` are counted in `report`."""
    for part in open_source(source, split, report.source):
        kind, seen = None, 0
        if part.columns is not None:
            try:
                kind = detect_kind(part.columns, _Ctx(part.name, part.header_row))
            except BadRowError as e:
                raise UserError(f"{e.detail} (columns: {', '.join(part.columns)})",
                                source=part.name, row=part.header_row, field=e.field) from None
        for row, record in part.rows:
            seen += 1
            report.rows_read += 1
            try:
                if isinstance(record, BadRowError):
                    raise record
                ex = to_example(record, part.name, row, kind, report.kind)
            except BadRowError as e:
                if not skip:
                    raise
                report.add_bad(e)
                continue
            report.add_example(ex)
            yield ex
        if not seen:
            raise UserError("no rows: the file is empty", source=part.name)


def load_preferences(source: Any, cfg: DataConfig, *, split: str | None = None,
                     name: str | None = None) -> tuple[list[PreferenceExample], DataReport]:
    """Read, validate and normalise every row of `source` (the trainer's entry point): a path or
    hub name, or in memory a `datasets.Dataset` or a list of dicts (`name` names it in messages)."""
    name = source_name(source, name)
    report = DataReport(source=name)
    examples = list(iter_preferences(source, split or cfg.split, report,
                                     skip=cfg.on_bad_rows == "skip"))
    if not examples:
        raise no_usable_rows(report)
    return examples, report


def source_name(source: Any, name: str | None = None) -> str:
    """How messages name a source: `name`, else its path or hub name, else `rows`; no source at
    all is an error."""
    if source is None or isinstance(source, (str, Path)) and not str(source):
        raise UserError("no data source given (set data.train)")
    if name is None:
        name = str(source) if isinstance(source, (str, Path)) else "rows"
    return name


def no_usable_rows(report: DataReport) -> UserError:
    """The error for a source none of whose rows could be used."""
    first = f"; first: {report.messages[0]}" if report.messages else ""
    return UserError(f"no usable rows ({report.num_bad} bad rows skipped{first})",
                     source=report.source)


def read_prompts(path: str) -> list[Text]:
    """Prompts for the global KL: `.txt` one per non-blank line, or rows with a `prompt` field."""
    prompts: list[Text] = []
    if Path(path).suffix.lower() == ".txt":
        if not Path(path).is_file():
            raise UserError("file not found", source=path)
        with open(path, "rb") as f:
            for line, raw in enumerate(f, 1):
                text = _decode(raw, path, line)
                if isinstance(text, BadRowError):
                    raise text
                if text.strip():
                    prompts.append(text.rstrip("\r\n"))
    else:
        for part in open_source(path):
            for row, rec in part.rows:
                if isinstance(rec, BadRowError):
                    raise rec
                ctx = _Ctx(part.name, row)
                _require(ctx, rec, "prompt")
                prompts.append(_text(ctx, rec["prompt"], "prompt"))
    if not prompts:
        raise UserError("no prompts: the file is empty", source=path)
    return prompts


def prompts_from_examples(examples: list[PreferenceExample]) -> list[Text]:
    """The distinct prompts of some examples, in first-seen order."""
    return distinct_prompts(ex.prompt for ex in examples)


def distinct_prompts(prompts: Iterable[Text]) -> list[Text]:
    """The distinct prompts, in first-seen order."""
    seen: dict[Any, Text] = {}
    for p in prompts:
        key = (True, p) if isinstance(p, str) else (False, json.dumps(p, sort_keys=True))
        seen.setdefault(key, p)
    return list(seen.values())
