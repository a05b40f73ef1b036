"""`pretrace index` then `pretrace score --index` end to end: the same scores as scoring from scratch."""

import argparse
import json

import pytest
import torch

from pretrace.cli import index as index_command
from pretrace.cli import main
from pretrace.scores.io import load_scores
from tiny import SENTENCES, save_tiny_model

QUERIES = [{"prompt": "paris is the capital of", "completion": " france ."}, {"prompt": "the cat sat", "completion": " on the mat ."}]


def _index(*argv) -> int:
    parser = argparse.ArgumentParser()
    index_command.register(parser.add_subparsers())
    return index_command.run(parser.parse_args(["index", *argv]))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("index")
    save_tiny_model(root / "model", "gpt_neox", dtype=torch.float64)
    (root / "docs.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": s}) + "\n" for i, s in enumerate(SENTENCES)))
    (root / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUERIES))
    common = ["--model", str(root / "model"), "--batch-size", "3", "--dtype", "float64"]
    assert main(["fit", *common, "--data", str(root / "docs.jsonl"), "--out", str(root / "factors")]) == 0
    return root, common


def _score(root, common, out, *extra):
    return main(["score", *common, "--factors", str(root / "factors"), "--queries", str(root / "q.jsonl"), "--train", str(root / "docs.jsonl"),
                 "--out", str(out), "--no-explain", *extra])


@pytest.mark.parametrize("storage", ["exact", "factored"])
def test_index_then_score_equals_scoring_from_scratch(workspace, tmp_path, storage):
    root, common = workspace
    assert _index(*common, "--train", str(root / "docs.jsonl"), "--out", str(tmp_path / "index"), "--storage", storage, "--batches-per-shard", "2") == 0
    assert _score(root, common, tmp_path / "plain") == 0
    assert _score(root, common, tmp_path / "indexed", "--index", str(tmp_path / "index")) == 0
    (plain, plain_meta), (indexed, indexed_meta) = load_scores(tmp_path / "plain"), load_scores(tmp_path / "indexed")
    torch.testing.assert_close(indexed["scores"], plain["scores"], rtol=1e-5, atol=1e-7)  # stored as float32
    assert indexed_meta["document_ids"] == plain_meta["document_ids"]


def test_index_of_other_documents_and_a_zero_rank_are_refused(workspace, tmp_path, capsys):
    root, common = workspace
    (tmp_path / "other.jsonl").write_text(json.dumps({"text": "the cat sat on the mat ."}) + "\n")
    assert _index(*common, "--train", str(tmp_path / "other.jsonl"), "--out", str(tmp_path / "index")) == 0
    assert _score(root, common, tmp_path / "s", "--index", str(tmp_path / "index")) == 2
    assert _score(root, common, tmp_path / "s", "--query-rank", "0") == 2
    err = capsys.readouterr().err
    assert "was built on other documents than --train" in err and "--query-rank must be at least 1" in err


def test_low_rank_queries_record_their_error(workspace, tmp_path):
    root, common = workspace
    assert _index(*common, "--train", str(root / "docs.jsonl"), "--out", str(tmp_path / "index")) == 0
    assert _score(root, common, tmp_path / "s", "--index", str(tmp_path / "index"), "--query-rank", "1") == 0
    error = load_scores(tmp_path / "s")[1]["timings"]["query_low_rank_relative_error"]
    assert len(error) == 2 and all(0 < e < 1 for e in error)


def test_low_rank_queries_without_index_match_the_index_path(workspace, tmp_path):
    """The streaming path and the index path truncate the same preconditioned queries to the same rank."""
    root, common = workspace
    assert _index(*common, "--train", str(root / "docs.jsonl"), "--out", str(tmp_path / "index")) == 0
    assert _score(root, common, tmp_path / "indexed", "--index", str(tmp_path / "index"), "--query-rank", "1") == 0
    assert _score(root, common, tmp_path / "streamed", "--query-rank", "1") == 0
    (indexed, _), (streamed, meta) = load_scores(tmp_path / "indexed"), load_scores(tmp_path / "streamed")
    torch.testing.assert_close(streamed["scores"], indexed["scores"], rtol=1e-4, atol=1e-6)
    error = meta["hyperparameters"]["query_rank_relative_error"]
    assert len(error) == 2 and all(0 < e < 1 for e in error)
