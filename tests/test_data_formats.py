"""Every record format gives the same records, so the same factors and scores as JSONL: a JSON array, CSV, TSV,
Parquet, a `datasets` folder, other column names; and each bad source is refused before any work."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pretrace.cli import main
from pretrace.data.records import Fields, read_documents, read_queries
from tiny import SENTENCES, save_tiny_model, write_jsonl

COMMON = ["--device", "cpu", "--dtype", "float64", "--max-length", "32"]
DOCUMENTS = [{"id": f"00{i}", "text": s} for i, s in enumerate(SENTENCES)]
QUERIES = [{"id": "q1", "prompt": "paris is the capital of", "completion": " france ."},
           {"id": "q2", "prompt": "the cat sat", "completion": " on the mat ."}]


def _write(path, rows, fmt, rename=None):
    """`rows` in format `fmt`, columns renamed by `rename`."""
    import pyarrow as pa
    from pyarrow import csv, parquet

    rows = [{(rename or {}).get(k, k): v for k, v in row.items()} for row in rows]
    if fmt == "jsonl":
        write_jsonl(path, rows)
    elif fmt == "json":
        path.write_text(json.dumps(rows, indent=1))
    elif fmt in ("csv", "tsv"):
        csv.write_csv(pa.Table.from_pylist(rows), path, csv.WriteOptions(delimiter="," if fmt == "csv" else "\t"))
    elif fmt == "parquet":
        parquet.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "datasets":
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


FORMATS = {"json": "docs.json", "csv": "docs.csv", "tsv": "docs.tsv", "parquet": "docs.parquet", "datasets": "docs-dataset"}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    save_tiny_model(root / "model")
    _write(root / "docs.jsonl", DOCUMENTS, "jsonl")
    _write(root / "q.jsonl", QUERIES, "jsonl")
    assert main(["fit", "--model", str(root / "model"), "--data", str(root / "docs.jsonl"), "--out", str(root / "f-jsonl"), *COMMON]) == 0
    assert main(["score", "--model", str(root / "model"), "--factors", str(root / "f-jsonl"), "--queries", str(root / "q.jsonl"),
                 "--train", str(root / "docs.jsonl"), "--out", str(root / "s-jsonl"), *COMMON]) == 0
    return root


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_reads_the_same_records(baseline, fmt):
    documents = _write(baseline / FORMATS[fmt], DOCUMENTS, fmt)
    assert read_documents(documents) == read_documents(baseline / "docs.jsonl")
    assert [d.id for d in read_documents(documents)][:2] == ["000", "001"]  # ids stay text: leading zeros kept
    queries = _write(baseline / f"q-{fmt}{'' if fmt == 'datasets' else '.' + fmt}", QUERIES, fmt)
    assert read_queries(queries) == read_queries(baseline / "q.jsonl")


@pytest.mark.parametrize("fmt", ["csv", "parquet", "datasets"])
def test_factors_and_scores_are_those_of_jsonl_with_other_column_names(baseline, fmt):
    rename = {"text": "body", "id": "doc_id", "prompt": "question", "completion": "answer"}
    suffix = "" if fmt == "datasets" else f".{fmt}"
    documents = _write(baseline / f"renamed-docs{suffix}", DOCUMENTS, fmt, rename)
    queries = _write(baseline / f"renamed-q{suffix}", QUERIES, fmt, rename)
    fields = ["--text-field", "body", "--id-field", "doc_id", "--prompt-field", "question", "--completion-field", "answer"]
    assert main(["fit", "--model", str(baseline / "model"), "--data", str(documents), "--out", str(baseline / f"f-{fmt}"), *COMMON, *fields]) == 0
    assert main(["score", "--model", str(baseline / "model"), "--factors", str(baseline / f"f-{fmt}"), "--queries", str(queries),
                 "--train", str(documents), "--out", str(baseline / f"s-{fmt}"), *COMMON, *fields]) == 0
    for name, value in load_file(str(baseline / "f-jsonl" / "factors.safetensors")).items():
        assert torch.equal(load_file(str(baseline / f"f-{fmt}" / "factors.safetensors"))[name], value), name
    assert torch.equal(load_file(str(baseline / f"s-{fmt}" / "scores.safetensors"))["scores"],
                       load_file(str(baseline / "s-jsonl" / "scores.safetensors"))["scores"])
    meta = json.loads((baseline / f"s-{fmt}" / "scores.json").read_text())
    assert meta["document_ids"][:2] == ["000", "001"] and meta["query_ids"] == ["q1", "q2"]


def test_a_fine_tune_from_parquet_equals_one_from_jsonl(baseline):
    _write(baseline / "qa.parquet", QUERIES, "parquet")
    for name in ("q.jsonl", "qa.parquet"):
        assert main(["finetune", "--model", str(baseline / "model"), "--data", str(baseline / name), "--out", str(baseline / f"ft-{name}"),
                     "--alpha", "0.1", "--epochs", "1", "--batch-size", "2", "--device", "cpu", "--dtype", "float64"]) == 0
    first, second = (load_file(str(baseline / f"ft-{n}" / "model.safetensors")) for n in ("q.jsonl", "qa.parquet"))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_bad_sources_are_refused_with_their_place(baseline, tmp_path, capsys):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(DOCUMENTS), "test": datasets.Dataset.from_list(DOCUMENTS)}).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "latin1.csv").write_bytes("id,text\n0,caf\xe9 au lait\n".encode("latin-1"))
    _write(tmp_path / "missing-column.parquet", [{"id": "0", "body": "a b c"}], "parquet")
    (tmp_path / "plain").mkdir()
    cases = {
        str(tmp_path / "dict"): r"holds the splits \['test', 'train'\]; pass one of them",
        str(tmp_path / "latin1.csv"): r"latin1\.csv: not a readable CSV file of UTF-8 text",
        str(tmp_path / "missing-column.parquet"): r"missing-column\.parquet row 1: missing field 'text' .*--text-field.* name other columns\); found \['body', 'id'\]",
        str(tmp_path / "plain"): r"plain: a folder, but not one written by datasets' save_to_disk",
        "someone/not-a-local-dataset": r"the hub dataset 'someone/not-a-local-dataset' \(split 'train'\) could not be fetched .*save_to_disk\(FOLDER\)",
    }
    import re

    for source, message in cases.items():
        out = tmp_path / "out"
        assert main(["fit", "--model", str(baseline / "model"), "--data", source, "--out", str(out), *COMMON]) == 2, source
        err = capsys.readouterr().err
        assert re.search(message, err) and "Traceback" not in err, err
        assert not out.exists()


def test_fields_leave_other_columns_and_default_records_untouched():
    assert Fields().canonical({"text": "a", "x": 1}, "f:1") == {"text": "a", "x": 1}
    assert Fields(text="body").canonical({"body": "a", "text": "other", "evidence_ids": [1]}, "f:1") == {"text": "a", "evidence_ids": [1]}
