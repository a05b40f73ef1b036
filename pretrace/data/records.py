"""JSONL records: training documents (`text`, optional `id`) and queries (`prompt` + `completion`, or `text`).

Records are streamed line by line so a corpus never has to fit in memory; every problem is reported
with the file and line number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pretrace.errors import PretraceError


@dataclass(frozen=True)
class Document:
    id: str
    text: str


@dataclass(frozen=True)
class Query:
    """A measurement target: the loss of `completion` given `prompt`, or of the whole `prompt` if no completion."""

    id: str
    prompt: str
    completion: str | None = None

    @property
    def text(self) -> str:
        return self.prompt + (self.completion or "")


def iter_json_objects(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSONL file; bad lines are reported with their number."""
    path = Path(path)
    if not path.is_file():
        raise PretraceError(f"{path}: no such file; pass the path of a JSONL file (one JSON object per line).")
    with path.open("r", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PretraceError(f"{path}:{line_number}: not valid JSON ({exc.msg}); each line must be one JSON object.") from None
            if not isinstance(obj, dict):
                raise PretraceError(f"{path}:{line_number}: expected a JSON object, got {type(obj).__name__}.")
            yield line_number, obj


def _string_field(path, line_number: int, obj: dict, key: str, required: bool) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise PretraceError(f"{path}:{line_number}: missing field '{key}' (found: {sorted(obj)}).")
        return None
    if not isinstance(value, str):
        raise PretraceError(f"{path}:{line_number}: field '{key}' must be a string, got {type(value).__name__}.")
    return value


def _record_id(obj: dict, index: int) -> str:
    value = obj.get("id")
    return str(index) if value is None else str(value)


def iter_documents(path: str | Path) -> Iterator[Document]:
    """Stream documents; ids default to the 0-based record index."""
    seen_any = False
    for index, (line_number, obj) in enumerate(iter_json_objects(path)):
        text = _string_field(path, line_number, obj, "text", required=True)
        if not text.strip():
            raise PretraceError(f"{path}:{line_number}: field 'text' is empty.")
        seen_any = True
        yield Document(id=_record_id(obj, index), text=text)
    if not seen_any:
        raise PretraceError(f"{path}: no documents; the file is empty.")


def iter_queries(path: str | Path) -> Iterator[Query]:
    """Stream queries: `prompt` + non-empty `completion`, or a bare `text` (whole-text loss)."""
    seen_any = False
    for index, (line_number, obj) in enumerate(iter_json_objects(path)):
        prompt = _string_field(path, line_number, obj, "prompt", required=False)
        completion = _string_field(path, line_number, obj, "completion", required=False)
        text = _string_field(path, line_number, obj, "text", required=False)
        if prompt is not None:
            if completion is None:
                raise PretraceError(f"{path}:{line_number}: query has 'prompt' but no 'completion'; add the completion to measure, or give the whole string as 'text'.")
            if not completion.strip():
                raise PretraceError(f"{path}:{line_number}: 'completion' is empty; the measurement is the loss of the completion tokens, so it needs at least one.")
            query = Query(id=_record_id(obj, index), prompt=prompt, completion=completion)
        elif text is not None:
            if not text.strip():
                raise PretraceError(f"{path}:{line_number}: field 'text' is empty.")
            query = Query(id=_record_id(obj, index), prompt=text, completion=None)
        else:
            raise PretraceError(f"{path}:{line_number}: a query needs 'prompt' and 'completion' (or 'text'); found {sorted(obj)}.")
        seen_any = True
        yield query
    if not seen_any:
        raise PretraceError(f"{path}: no queries; the file is empty.")


def read_documents(path: str | Path) -> list[Document]:
    return list(iter_documents(path))


def read_queries(path: str | Path) -> list[Query]:
    return list(iter_queries(path))


def count_records(path: str | Path) -> int:
    """Number of non-blank lines: a cheap total for progress bars."""
    with Path(path).open("rb") as handle:
        return sum(1 for line in handle if line.strip())
