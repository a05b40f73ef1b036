"""Property-based tests (hypothesis): whatever a user writes into a record file, a settings call or a pipeline file,
pretrace reads it or refuses it with a message (`PretraceError`, or `TypeError` for a Python argument of the wrong
type), never another exception; what it reads is what was written, and settings survive their flat keys."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, event, given, settings, strategies as st

from pretrace.cli import build_parser
from pretrace.cli.run import check_pipeline, resolve
from pretrace.config import flat_keys, from_flags, to_flags
from pretrace.data.records import iter_documents, read_queries, scan_records, validate_documents
from pretrace.errors import PretraceError
from pretrace.workflows.score import ScoreSettings
from pretrace.workflows.trace import read_trace_queries

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(), st.text(max_size=8))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)
fields = st.sampled_from(["text", "prompt", "completion", "id", "evidence_ids"]) | st.text(max_size=4)
strings = st.text(max_size=8)
plausible = st.one_of(st.fixed_dictionaries({"text": strings}, optional={"id": strings | st.integers()}),  # mostly the shapes users write
                      st.fixed_dictionaries({"prompt": strings, "completion": strings}, optional={"id": strings, "evidence_ids": st.lists(strings)}))
records = plausible | st.dictionaries(fields, json_values, max_size=5)
lines = st.lists(st.one_of(records.map(lambda r: json.dumps(r).encode()), records.map(lambda r: json.dumps(r).encode()),
                           st.text(max_size=12).map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary(max_size=12), st.just(b"")), max_size=6)
READERS = [validate_documents, read_queries, scan_records, read_trace_queries, lambda path: read_queries(path, "fine-tuning example")]


@SETTINGS
@given(content=lines)
def test_record_readers_read_or_refuse_anything(tmp_path, content):
    path = tmp_path / "records.jsonl"
    path.write_bytes(b"\n".join(content))
    for name, reader in zip(("documents", "queries", "fitting data", "trace queries", "fine-tuning examples"), READERS):
        try:
            reader(path)
            event(f"read as {name}")
        except PretraceError:
            event(f"refused as {name}")


text = st.text(min_size=1, max_size=20).filter(lambda t: t.strip() and not any(0xD800 <= ord(c) <= 0xDFFF for c in t))


@SETTINGS
@given(documents=st.lists(st.tuples(st.text(max_size=6).filter(lambda t: not any(0xD800 <= ord(c) <= 0xDFFF for c in t)), text),
                          min_size=1, max_size=6, unique_by=lambda d: d[0]), as_array=st.booleans())
def test_documents_read_back_as_written(tmp_path, documents, as_array):
    rows = [{"id": doc_id, "text": body} for doc_id, body in documents]
    path = tmp_path / ("docs.json" if as_array else "docs.jsonl")
    path.write_text(json.dumps(rows) if as_array else "".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    assert [(d.id, d.text) for d in iter_documents(path)] == documents


def _value(key: str):
    field = flat_keys(ScoreSettings)[key]
    choices = field.metadata.get("choices")
    return st.sampled_from(list(choices)) | scalars if choices else scalars


@SETTINGS
@given(data=st.data())
def test_score_settings_build_or_refuse_and_survive_their_flat_keys(data):
    keys = data.draw(st.lists(st.sampled_from(sorted(set(flat_keys(ScoreSettings)) - {"queries", "train", "out"})), max_size=6, unique=True))
    values = {key: data.draw(_value(key), label=key) for key in keys}
    try:
        built = from_flags(ScoreSettings, queries="q.jsonl", train="t.jsonl", out="o", model="m", **values)
    except (TypeError, PretraceError) as refusal:
        event(f"refused: {type(refusal).__name__}")
        return
    event(f"built: --method {built.method.name}")
    assert from_flags(ScoreSettings, to_flags(built)) == built


commands = st.sampled_from(["fit", "score", "index", "finetune", "trace", "report", "inspect", "run", "nope"])


@SETTINGS
@given(data=st.data())
def test_pipeline_files_are_checked_or_refused(tmp_path, data):
    parser = build_parser()
    (tmp_path / "docs.jsonl").write_text('{"text": "a b c"}\n')
    (tmp_path / "q.jsonl").write_text('{"prompt": "a", "completion": " b"}\n')
    keys = st.sampled_from(["model", "data", "out", "queries", "train", "factors", "scores", "method", "damping", "top_k", "alpha",
                            "batch_size", "overwrite", "bogus"])
    paths = st.sampled_from([str(tmp_path / name) for name in ("x", "docs.jsonl", "q.jsonl", "out-a", "out-b")])
    steps = data.draw(st.lists(st.fixed_dictionaries({"run": commands}, optional={}).flatmap(
        lambda step: st.dictionaries(keys, scalars | paths, max_size=5).map(lambda extra: {**extra, **step})),
        max_size=3))
    pipeline = {"step": steps, **data.draw(st.fixed_dictionaries({}, optional={"defaults": st.dictionaries(keys, scalars, max_size=2)}))}
    try:
        check_pipeline(resolve(pipeline, parser))
        event("checked")
    except PretraceError:
        event("refused")
