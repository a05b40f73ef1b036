"""Random bytes flipped in every kind of file pretrace persists: reading it back either refuses with a message (exit 2,
no traceback) or gives exactly the result of an undamaged run (damaged work state is recomputed). Nothing damaged
ever enters a result."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from pretrace.cli import main
from pretrace.storage import checkpoint_folder, file_sha256
from tiny import tiny_workspace, write_jsonl

REPO = Path(__file__).resolve().parents[1]
PAIRS = [{"prompt": "the capital of france is", "completion": " paris ."}, {"prompt": "birds can", "completion": " fly ."}]
COMMON = ["--batch-size", "3"]


def _fit(root: Path, out: Path, *extra: str) -> list[str]:
    return ["fit", "--model", str(root / "model"), "--data", str(root / "docs.jsonl"), "--out", str(out), *COMMON, *extra]


def _score(root: Path, out: Path, *extra: str, factors: Path | None = None) -> list[str]:
    return ["score", "--model", str(root / "model"), "--factors", str(factors or root / "factors"), "--queries", str(root / "q.jsonl"),
            "--train", str(root / "docs.jsonl"), "--out", str(out), "--top-k", "3", *COMMON, *extra]


def _multi(root: Path, out: Path, tuned: Path) -> list[str]:
    return ["score", "--pretrained", str(root / "model"), "--finetuned", str(tuned), "--pretrained-factors", str(root / "factors"),
            "--finetuned-factors", str(root / "tuned-factors"), "--queries", str(root / "q.jsonl"), "--train", str(root / "docs.jsonl"),
            "--out", str(out), "--top-k", "3", *COMMON]


def _index(root: Path, out: Path) -> list[str]:
    return ["index", "--model", str(root / "model"), "--train", str(root / "docs.jsonl"), "--out", str(out), "--batches-per-shard", "1", *COMMON]


def _trace(root: Path, out: Path) -> list[str]:
    return ["trace", "--pretrained", str(root / "model"), "--finetuned", str(root / "tuned"), "--corpus", str(root / "docs.jsonl"),
            "--queries", str(root / "pairs.jsonl"), "--out", str(out), "--candidates", "4", "--top-k", "2", "--fit-documents", "4", *COMMON]


def _killed(argv: list[str], fault: str) -> None:
    env = {**os.environ, "PRETRACE_FAULT": fault, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "pretrace", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 86, done.stderr[-2000:]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Every kind of persisted file, next to the result of an undamaged run that reads it."""
    root = tiny_workspace(tmp_path_factory.mktemp("corruption"))
    write_jsonl(root / "pairs.jsonl", PAIRS)
    assert main(_fit(root, root / "factors")) == 0
    assert main(["finetune", "--model", str(root / "model"), "--data", str(root / "pairs.jsonl"), "--out", str(root / "tuned"), "--alpha", "0.1",
                 "--epochs", "1"]) == 0
    assert main(["fit", "--model", str(root / "tuned"), "--data", str(root / "pairs.jsonl"), "--out", str(root / "tuned-factors"), *COMMON]) == 0
    assert main(_score(root, root / "scores", "--per-module")) == 0
    assert main(_multi(root, root / "multi", root / "tuned")) == 0
    assert main(_index(root, root / "index")) == 0
    assert main(_score(root, root / "from-index", "--index", str(root / "index"), "--no-explain")) == 0
    assert main(_trace(root, root / "trace")) == 0
    assert main(["score", "--method", "bm25", "--queries", str(root / "q.jsonl"), "--train", str(root / "docs.jsonl"), "--out", str(root / "bm25"),
                 "--text-index", str(root / "bm25-index")]) == 0
    _killed([*_fit(root, root / "killed-fit", "--checkpoint-every", "1")], "checkpoint:5")  # both passes checkpointed
    _killed([*_score(root, root / "killed-score", "--per-module", "--checkpoint-every", "1")], "score-checkpoint:2")
    return root


def _flip(path: Path, seed: int, flips: int = 3) -> None:
    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    for _ in range(flips):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def _refused_or(code: int, capsys, same: bool) -> None:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err[-2000:]
    assert code == 2 or (code == 0 and same), err[-2000:]


def _same(a: Path, b: Path) -> bool:
    return a.is_file() and file_sha256(a) == file_sha256(b)


RESULTS = [("factors", name, "score") for name in ("factors.safetensors", "factors.json", ".pretrace.json")] + \
    [("scores", name, "inspect") for name in ("scores.safetensors", "scores.json", "top_k.jsonl", ".pretrace.json")] + \
    [("index", name, "index") for name in ("shard-00000.safetensors", "index.json", ".pretrace.json")] + \
    [("tuned", name, "multi") for name in ("model.safetensors", "config.json", "tokenizer.json", "pretrace_finetune.json", ".pretrace.json")] + \
    [("bm25-index", name, "bm25") for name in ("manifest.json", ".pretrace.json", "params.index.json")]


@pytest.mark.parametrize("folder,name,reader", RESULTS, ids=[f"{f}/{n}" for f, n, _ in RESULTS])
def test_a_damaged_result_is_refused_or_read_as_written(ws, tmp_path, capsys, folder, name, reader):
    copy = Path(shutil.copytree(ws / folder, tmp_path / folder))
    _flip(copy / name, seed=zlib.crc32(f"{folder}/{name}".encode()))
    out = tmp_path / "out"
    argv, reference = {
        "score": (_score(ws, out, "--per-module", factors=copy), ws / "scores" / "scores.safetensors"),
        "inspect": (["inspect", str(copy)], None),
        "index": (_score(ws, out, "--index", str(copy), "--no-explain"), ws / "from-index" / "scores.safetensors"),
        "multi": (_multi(ws, out, copy), ws / "multi" / "scores.safetensors"),
        "bm25": (["score", "--method", "bm25", "--queries", str(ws / "q.jsonl"), "--train", str(ws / "docs.jsonl"), "--out", str(out),
                  "--text-index", str(copy)], ws / "bm25" / "scores.safetensors"),
    }[reader]
    code = main(argv)
    _refused_or(code, capsys, same=reference is None or _same(out / "scores.safetensors", reference))


WORK_STATE = [("killed-fit", "covariances.safetensors"), ("killed-fit", "lambda.safetensors"),
              ("killed-score", "rank0000-part-0000000001.safetensors"), ("killed-score", "rank0000-explanations.safetensors")]


@pytest.mark.parametrize("run,name", WORK_STATE, ids=[f"{r}/{n}" for r, n in WORK_STATE])
def test_damaged_work_state_is_recomputed_to_the_same_result(ws, tmp_path, capsys, run, name):
    shutil.copytree(checkpoint_folder(ws / run), checkpoint_folder(tmp_path / run))
    _flip(checkpoint_folder(tmp_path / run) / name, seed=zlib.crc32(name.encode()))
    if run == "killed-fit":
        code, reference = main([*_fit(ws, tmp_path / run, "--checkpoint-every", "1")]), ws / "factors" / "factors.safetensors"
        produced = tmp_path / run / "factors.safetensors"
    else:
        code, reference = main([*_score(ws, tmp_path / run, "--per-module", "--checkpoint-every", "1")]), ws / "scores" / "scores.safetensors"
        produced = tmp_path / run / "scores.safetensors"
    _refused_or(code, capsys, same=_same(produced, reference))


TRACE_FILES = ["stages.json", "results.jsonl", "candidates.json", "queries.jsonl", "scores/scores.safetensors", "factors/pretrained/factors.safetensors"]


@pytest.mark.parametrize("name", TRACE_FILES)
def test_a_damaged_stage_of_a_run_folder_is_recomputed(ws, tmp_path, capsys, name):
    run = Path(shutil.copytree(ws / "trace", tmp_path / "trace"))
    _flip(run / name, seed=zlib.crc32(name.encode()))
    code = main(_trace(ws, run))
    _refused_or(code, capsys, same=_same_results(run, ws / "trace"))


def _same_results(run: Path, reference: Path) -> bool:
    """The same documents and ranks; scores and explanations equal up to float32 rounding (a reused scoring stage is
    read back from its float32 file, and its top documents explained by rescoring them: see tests/test_explanations.py)."""
    read = lambda folder: [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]  # noqa: E731
    rows, expected = read(run), read(reference)
    for row, other in zip(rows, expected, strict=True):
        for doc, ref in zip(row["documents"], other["documents"], strict=True):
            if (doc["id"], doc["rank"], doc["tokens"]) != (ref["id"], ref["rank"], ref["tokens"]) or abs(doc["score"] - ref["score"]) > 1e-6 * abs(ref["score"]):
                return False
            scale = max(1e-12, max(abs(v) for v in ref["token_scores"]))
            if max(abs(a - b) for a, b in zip(doc["token_scores"], ref["token_scores"], strict=True)) > 1e-5 * scale:
                return False
    return True
