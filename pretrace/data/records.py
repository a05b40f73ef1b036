"""Records: training documents (`text`, optional `id`) and queries (`prompt` + `completion`, or `text`).

A source is a JSONL file (streamed line by line), a JSON array, a CSV/TSV or Parquet file (read in blocks
by pyarrow), a `datasets` folder written by `save_to_disk`, a Hugging Face hub dataset name (`name` or
`name:split`, through `datasets` when the machine is online), or, from Python, the records themselves: a
list of dicts, strings (a document's text), `Document`s or `Query`s, or a `datasets.Dataset`. `Fields` maps other column names onto the
canonical ones. Every problem is reported with the source and its line or row number, and every format
gives the same records, so the same factors and scores.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from pretrace.errors import PretraceError
from pretrace.extras import require
from pretrace.settings.records import DEFAULT_FIELDS, Fields
from pretrace.storage import file_sha256


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


TABULAR = {".csv": ",", ".tsv": "\t"}
BLOCK_ROWS = 1024


RecordSource = str | Path | Sequence[Any]  # or a datasets.Dataset (duck-typed: no import of datasets here)


def in_memory(source: Any) -> bool:
    """True for records handed over from Python (a list, a tuple, a `datasets.Dataset`), not named by a path."""
    return not isinstance(source, (str, Path))


def _is_arrow_dataset(source: Any) -> bool:
    return hasattr(source, "column_names") and hasattr(source, "features") and hasattr(source, "__len__")


def _check_memory_source(source: Any) -> None:
    if isinstance(source, (list, tuple)) or _is_arrow_dataset(source):
        return
    raise TypeError(f"records must be a path, a list (of dicts, strings, Documents or Queries) or a datasets.Dataset, "
                    f"not {type(source).__name__}{' (a generator is read once; pass list(...))' if hasattr(source, '__next__') else ''}.")


def _memory_rows(source: Any) -> Iterator[tuple[str, dict]]:
    """(where, record) of records held in memory; `where` is 'item N' (0-based, as Python indexes the list)."""
    if _is_arrow_dataset(source):
        yield from ((f"dataset row {row}", dict(obj)) for row, obj in enumerate(source, start=1))
        return
    for index, item in enumerate(source):
        where = f"item {index}"
        if isinstance(item, dict):
            yield where, item
        elif isinstance(item, str):
            yield where, {"text": item}
        elif isinstance(item, Document):
            yield where, {"id": item.id, "text": item.text}
        elif isinstance(item, Query):
            yield where, ({"id": item.id, "text": item.prompt} if item.completion is None
                          else {"id": item.id, "prompt": item.prompt, "completion": item.completion})
        else:
            raise PretraceError(f"{where}: expected a dict, a string, a Document or a Query, got {type(item).__name__}.")


def _is_dataset_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def _hub_name(source: str) -> tuple[str, str] | None:
    """(name, split) when `source` reads as a hub dataset name rather than a path."""
    name, _, split = str(source).partition(":")
    if not name or name.startswith((".", "/", "~")) or Path(name).suffix or name.count("/") > 1:
        return None
    return name, split or "train"


def check_source(source: RecordSource, what: str = "records") -> None:
    """Refuse a source that is no readable file, `datasets` folder, hub name or in-memory records, before any work."""
    if in_memory(source):
        return _check_memory_source(source)
    path = Path(source)
    if path.is_file() or _is_dataset_folder(path):
        return
    if path.exists() and not path.is_dir():
        raise PretraceError(f"{path}: not a regular file (a pipe, socket or device), which pretrace must read more than once; "
                            f"save the {what} to a file and pass that.")
    if path.is_dir():
        raise PretraceError(f"{path}: a folder, but not one written by datasets' save_to_disk (no dataset_info.json); pass a JSONL, JSON, CSV or Parquet file of {what}.")
    if _hub_name(str(source)) is None:
        raise PretraceError(f"{path}: no such file; pass a JSONL, JSON, CSV or Parquet file (or a datasets folder) of {what}.")


def source_sha256(source: RecordSource) -> str:
    """What identifies a source's contents: a file's sha256, a folder's over its files, a hub name itself, records in
    memory their canonical JSON."""
    if in_memory(source):
        digest = hashlib.sha256()
        for _, obj in _memory_rows(source):
            digest.update(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass") + b"\n")
        return digest.hexdigest()
    path = Path(source)
    if path.is_file():
        return file_sha256(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(file.relative_to(path)).encode())
            digest.update(file_sha256(file).encode())
        return digest.hexdigest()
    return hashlib.sha256(f"hub:{source}".encode()).hexdigest()


def iter_records(source: RecordSource, fields: Fields = DEFAULT_FIELDS) -> Iterator[tuple[str, dict]]:
    """(where, record) for every record of `source`, columns renamed by `fields`; `where` is `path:line`, `path row N`
    or, in memory, `item N`."""
    path = None if in_memory(source) else Path(source)
    if path is None:
        _check_memory_source(source)
        rows = _memory_rows(source)
    elif path.is_file() and path.suffix in TABULAR:
        rows = _tabular_rows(path, TABULAR[path.suffix])
    elif path.is_file() and path.suffix == ".parquet":
        rows = _parquet_rows(path)
    elif path.is_file() and path.suffix == ".json" and _starts_with(path, b"["):
        rows = _json_array_rows(path)
    elif path.is_file():
        rows = ((f"{path}:{line}", obj) for line, obj in iter_json_objects(path))
    elif _is_dataset_folder(path):
        rows = _dataset_rows(_load_dataset_folder(path), str(path))
    else:
        check_source(source)
        rows = _dataset_rows(_load_hub_dataset(*_hub_name(str(source))), str(source))
    for where, obj in rows:
        yield where, fields.canonical(obj, where)


def _starts_with(path: Path, prefix: bytes) -> bool:
    with path.open("rb") as handle:
        return handle.read(4096).lstrip().startswith(prefix)


def _json_array_rows(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise PretraceError(f"{path}: not UTF-8; re-encode the file as UTF-8 (e.g. iconv -t UTF-8).") from None
    except json.JSONDecodeError as exc:
        raise PretraceError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}).") from None
    for index, obj in enumerate(items):
        where = f"{path} item {index}"
        if not isinstance(obj, dict):
            raise PretraceError(f"{where}: expected a JSON object, got {type(obj).__name__}.")
        yield where, obj


def _arrow():
    require("pyarrow", purpose="a CSV or Parquet source")
    import pyarrow

    return pyarrow


def _tabular_rows(path: Path, delimiter: str) -> Iterator[tuple[str, dict]]:
    """Every column read as text (an id column of digits stays '007'), empty cells as empty strings."""
    pa = _arrow()
    from pyarrow import csv

    parse = csv.ParseOptions(delimiter=delimiter)
    try:
        names = csv.open_csv(path, parse_options=parse).schema.names
        reader = csv.open_csv(path, parse_options=parse, read_options=csv.ReadOptions(block_size=1 << 20),
                              convert_options=csv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=False))
        row = 0
        for batch in reader:
            for obj in batch.to_pylist():
                row += 1
                yield f"{path} row {row}", obj
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        raise PretraceError(f"{path}: not a readable {'CSV' if delimiter == ',' else 'TSV'} file of UTF-8 text ({exc}).") from None


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    pa = _arrow()
    from pyarrow import parquet

    try:
        handle = parquet.ParquetFile(path)
    except pa.ArrowException as exc:
        raise PretraceError(f"{path}: not a readable Parquet file ({exc}).") from None
    row = 0
    for batch in handle.iter_batches(batch_size=BLOCK_ROWS):
        for obj in batch.to_pylist():
            row += 1
            yield f"{path} row {row}", obj


def _datasets():
    require("datasets", purpose="a datasets folder or hub dataset")
    import datasets

    return datasets


def _load_dataset_folder(path: Path):
    datasets = _datasets()
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # a damaged folder: datasets and pyarrow raise many types
        raise PretraceError(f"{path}: a damaged `datasets` folder ({exc.__class__.__name__}: {str(exc)[:200]}); "
                            "save the dataset again with dataset.save_to_disk(folder).") from None
    if isinstance(loaded, datasets.DatasetDict):
        raise PretraceError(f"{path}: holds the splits {sorted(loaded)}; pass one of them, e.g. {path / sorted(loaded)[0]}.")
    return loaded


def _load_hub_dataset(name: str, split: str):
    datasets = _datasets()
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as exc:  # offline, unknown name or split: the hub client raises many types
        raise PretraceError(f"{name}: no such file, and the hub dataset {name!r} (split {split!r}) could not be fetched "
                            f"({exc.__class__.__name__}); on a machine online, save it with datasets.load_dataset({name!r}, split={split!r})"
                            ".save_to_disk(FOLDER) and pass FOLDER.") from None


def _dataset_rows(dataset, where: str) -> Iterator[tuple[str, dict]]:
    for row, obj in enumerate(dataset, start=1):
        yield f"{where} row {row}", dict(obj)


def iter_json_objects(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSONL file; bad lines are reported with their number."""
    path = Path(path)
    if not path.is_file():
        raise PretraceError(f"{path}: no such file; pass the path of a JSONL file (one JSON object per line).")
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PretraceError(f"{path}:{line_number}: not UTF-8 (byte {exc.start + 1} of the line); re-encode the file as UTF-8 (e.g. iconv -t UTF-8).") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PretraceError(f"{path}:{line_number}: not valid JSON ({exc.msg}); each line must be one JSON object.") from None
            if not isinstance(obj, dict):
                raise PretraceError(f"{path}:{line_number}: expected a JSON object, got {type(obj).__name__}.")
            yield line_number, obj


def _string_field(where: str, obj: dict, key: str, required: bool, fields: Fields = DEFAULT_FIELDS) -> str | None:
    if key not in obj:
        if required:
            raise PretraceError(f"{where}: missing field {fields.column(key)} (found: {sorted(obj)}; --{key}-field names another column).")
        return None
    value = obj[key]
    if value is None:
        raise PretraceError(f"{where}: field '{key}' is null; give it a string{'' if required else ' or leave the field out'}.")
    if not isinstance(value, str):
        raise PretraceError(f"{where}: field '{key}' must be a string, got {type(value).__name__}.")
    return encodable(where, key, value)


def encodable(where: str, key: str, value: str) -> str:
    """Refuse text that no tokenizer or UTF-8 file can hold: an unpaired surrogate (a JSON escape such as \\ud800)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise PretraceError(f"{where}: field '{key}' holds an unpaired surrogate ({value[error.start]!r} at character {error.start}), "
                            "which is no text; fix the record (a lone \\ud800-\\udfff escape is usually half of a broken emoji).") from None
    return value


class UniqueIds:
    """One rule for every input file: record ids are unique, so scores and reports can name documents by id."""

    def __init__(self, what: str):
        self.what, self.seen = what, {}

    def __call__(self, obj: dict, index: int, where: str) -> str:
        value = obj.get("id")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
            raise PretraceError(f"{where}: its id must be a string or an integer, got {type(value).__name__} {value!r:.60}.")
        record_id = str(index) if value is None else encodable(where, "id", str(value))
        if record_id in self.seen:
            raise PretraceError(
                f"{where}: {self.what} id {record_id!r} already appears at {self.seen[record_id]}; "
                "ids must be unique (fix the 'id' fields, or drop them all to number records by position)."
            )
        self.seen[record_id] = where
        return record_id


def _kind(source: RecordSource) -> str:
    if in_memory(source):
        return "dataset" if _is_arrow_dataset(source) else "list"
    return "file" if Path(source).is_file() else "dataset"


def _name(source: RecordSource) -> str:
    return "the records given" if in_memory(source) else str(source)


def iter_documents(source: RecordSource, fields: Fields = DEFAULT_FIELDS) -> Iterator[Document]:
    """Stream documents; ids default to the 0-based record index."""
    unique = UniqueIds("document")
    for index, (where, obj) in enumerate(iter_records(source, fields)):
        if "prompt" in obj or "completion" in obj:
            raise PretraceError(f"{where}: has 'prompt'/'completion' where a training document is expected; documents are {{'text', optional 'id'}} "
                                "(prompt/completion pairs are fine-tuning data or queries).")
        text = _string_field(where, obj, "text", required=True, fields=fields)
        if not text.strip():
            raise PretraceError(f"{where}: field 'text' is empty; drop the record or give the document's text.")
        yield Document(id=unique(obj, index, where), text=text)
    if not unique.seen:
        raise PretraceError(f"{_name(source)}: no documents; the {_kind(source)} is empty (it needs one {{\"text\": ...}} record per document).")


def _located_queries(source: RecordSource, what: str, fields: Fields) -> Iterator[tuple[str, Query]]:
    """(where, query) for every record; `what` names the records in errors."""
    unique = UniqueIds(what)
    for index, (where, obj) in enumerate(iter_records(source, fields)):
        prompt = _string_field(where, obj, "prompt", required=False)
        completion = _string_field(where, obj, "completion", required=False)
        text = _string_field(where, obj, "text", required=False)
        if text is not None and (prompt is not None or completion is not None):
            raise PretraceError(f"{where}: has both 'text' and 'prompt'/'completion'; give either 'prompt' + 'completion' or 'text' alone.")
        if prompt is not None:
            if completion is None:
                raise PretraceError(f"{where}: {what} has the prompt column {fields.column('prompt')} but not the completion column "
                                    f"{fields.column('completion')}; add the completion to measure, or give the whole string as 'text'.")
            if not completion.strip():
                raise PretraceError(f"{where}: 'completion' is empty; the measurement is the loss of the completion tokens, so it needs at least one.")
            query = Query(id=unique(obj, index, where), prompt=prompt, completion=completion)
        elif completion is not None:
            raise PretraceError(f"{where}: {what} has the completion column {fields.column('completion')} but not the prompt column "
                                f"{fields.column('prompt')}; add the prompt it completes, or give the whole string as 'text'.")
        elif text is not None:
            if not text.strip():
                raise PretraceError(f"{where}: field 'text' is empty; drop the record or give the text.")
            query = Query(id=unique(obj, index, where), prompt=text, completion=None)
        elif what == "record":  # fitting data: documents, or pairs
            raise PretraceError(f"{where}: missing field 'text' (or 'prompt' and 'completion' for fine-tuning data; --text-field, "
                                f"--prompt-field and --completion-field name other columns); found {sorted(obj)}.")
        else:
            raise PretraceError(f"{where}: a {what} needs 'prompt' and 'completion' (or 'text'; --prompt-field, --completion-field "
                                f"and --text-field name other columns); found {sorted(obj)}.")
        yield where, query
    if not unique.seen:
        plural = "queries" if what == "query" else f"{what}s"
        raise PretraceError(f"{_name(source)}: no {plural}; the {_kind(source)} is empty.")


def iter_queries(source: RecordSource, what: str = "query", fields: Fields = DEFAULT_FIELDS) -> Iterator[Query]:
    """Stream queries: `prompt` + non-empty `completion`, or a bare `text` (whole-text loss)."""
    return (query for _, query in _located_queries(source, what, fields))


def validate_documents(source: RecordSource, fields: Fields = DEFAULT_FIELDS) -> int:
    """Read every document once before any model work, so a bad record fails at once with its place; returns the count."""
    return sum(1 for _ in iter_documents(source, fields))


def scan_records(source: RecordSource, fields: Fields = DEFAULT_FIELDS) -> tuple[str, int]:
    """(kind, count) from one validating pass over every record: 'pairs' (every record has 'prompt' + 'completion')
    or 'documents' (every record is a bare 'text'). A source that mixes both is refused: fitting data is one or the other."""
    names = {"pairs": "a prompt/completion pair", "documents": "a bare 'text' record"}
    first: tuple[str, str] | None = None
    count = 0
    for where, query in _located_queries(source, "record", fields):
        kind = "pairs" if query.completion is not None else "documents"
        count += 1
        if first is None:
            first = (kind, where)
        elif kind != first[0]:
            raise PretraceError(
                f"{where}: {names[kind]}, but {first[1]} is {names[first[0]]}; give one kind per source "
                "(documents: {'text'}; fine-tuning data: {'prompt', 'completion'})."
            )
    return (first[0] if first else "documents"), count


def read_documents(source: RecordSource, fields: Fields = DEFAULT_FIELDS) -> list[Document]:
    return list(iter_documents(source, fields))


def read_queries(source: RecordSource, what: str = "query", fields: Fields = DEFAULT_FIELDS) -> list[Query]:
    return list(iter_queries(source, what, fields))
