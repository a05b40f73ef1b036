"""Kill `pretrace fit|index|score` at every named write boundary (PRETRACE_FAULT) and run the same command again:
it resumes to outputs bit-identical to an uninterrupted run, or refuses cleanly, and leaves no temporaries."""

import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pretrace.cli import main
from pretrace.storage import FAULT_ENV, FAULT_EXIT_CODE
from tiny import tiny_workspace

REPO = Path(__file__).resolve().parents[1]
SLOW = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny model, its data, and the uninterrupted reference outputs of fit, index and score."""
    root = tmp_path_factory.mktemp("faults")
    tiny_workspace(root)
    refs = root / "refs"
    for command in ("fit", "index", "score"):
        assert main(_argv(root, command, refs / command)) == 0
    return root


def _argv(root: Path, command: str, out: Path) -> list[str]:
    common = ["--model", str(root / "model"), "--batch-size", "3", "--out", str(out)]
    if command == "fit":  # 3 batches per pass, a checkpoint after each: 8 checkpoint writes, then the 2 factor files
        return ["fit", *common, "--data", str(root / "docs.jsonl"), "--checkpoint-every", "1"]
    if command == "index":  # writes: index.json (incomplete), 3 shards, index.json (complete)
        return ["index", *common, "--train", str(root / "docs.jsonl"), "--batches-per-shard", "1"]
    return ["score", *common, "--factors", str(root / "refs" / "fit"), "--queries", str(root / "q.jsonl"),
            "--train", str(root / "docs.jsonl"), "--no-explain"]  # writes: scores.safetensors, top_k.jsonl, scores.json


def _killed(argv: list[str], fault: str) -> subprocess.CompletedProcess:
    env = {**os.environ, FAULT_ENV: fault, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "pretrace", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _same_outputs(command: str, out: Path, ref: Path) -> None:
    if command == "score":  # scores.json holds timings; the scores and rankings must be identical
        names = ["scores.safetensors", "top_k.jsonl"]
        assert json.loads((out / "scores.json").read_text())["document_ids"] == json.loads((ref / "scores.json").read_text())["document_ids"]
    else:
        names = sorted(p.name for p in ref.iterdir())
        assert sorted(p.name for p in out.iterdir()) == names
    match, mismatch, errors = filecmp.cmpfiles(ref, out, names, shallow=False)
    assert not mismatch and not errors, f"differ from the uninterrupted run: {mismatch + errors}"


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


BOUNDARIES = [
    ("fit", "checkpoint:1", False), ("fit", "checkpoint:5", False), ("fit", "write:2", False), ("fit", "write:9", False),
    ("fit", "write:10", False), ("fit", "commit", False), ("fit", "committed", False),
    ("index", "write:1", False), ("index", "write:3", True), ("index", "write:5", False), ("index", "commit", False), ("index", "committed", False),
    ("score", "write:1", False), ("score", "write:2", False), ("score", "write:3", False), ("score", "commit", True), ("score", "committed", False),
]


@pytest.mark.parametrize("command,fault", [pytest.param(c, f, marks=() if fast else SLOW, id=f"{c}-{f}") for c, f, fast in BOUNDARIES])
def test_killed_run_resumes_to_identical_outputs_or_refuses(workspace, tmp_path, capsys, command, fault):
    out = tmp_path / "out"
    argv = _argv(workspace, command, out)
    killed = _killed(argv, fault)
    assert killed.returncode == FAULT_EXIT_CODE, killed.stderr[-2000:]
    assert f"injected fault at {fault.split(':')[0]!r}" in killed.stderr
    code = main(argv)
    err = capsys.readouterr().err
    if fault == "committed":  # the result was complete: the rerun refuses to replace it without --overwrite
        assert code == 2 and "already exists" in err and "Traceback" not in err
    else:
        assert code == 0, err
    _same_outputs(command, out, workspace / "refs" / command)
    assert _leftovers(out) == []


def test_kill_while_replacing_keeps_the_old_result_until_the_new_one_is_in(workspace, tmp_path):
    out = tmp_path / "out"
    argv = _argv(workspace, "fit", out) + ["--overwrite"]
    assert main(argv[:-1]) == 0
    old_result = {p.name: p.read_bytes() for p in out.iterdir()}
    assert _killed(argv, "commit").returncode == FAULT_EXIT_CODE
    old = [p for p in tmp_path.iterdir() if p.name.startswith(".out.") and p.name.endswith(".old")]
    assert len(old) == 1 and {p.name: p.read_bytes() for p in old[0].iterdir()} == old_result  # renamed aside, not deleted
    assert main(argv[:-1]) == 2  # without --overwrite: the old result is restored first, then kept
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old_result and _leftovers(out) == []
    assert main(argv) == 0
    _same_outputs("fit", out, workspace / "refs" / "fit")
    assert _leftovers(out) == []


def test_kill_during_checkpoint_never_double_counts(workspace, tmp_path):
    """Issue #18: a kill between a checkpoint's tensors and its counts resumed with sums and counts out of step."""
    out = tmp_path / "out"
    argv = _argv(workspace, "fit", out)
    assert _killed(argv, "write:3").returncode == FAULT_EXIT_CODE  # the third checkpoint save is written, not renamed in
    assert main(argv) == 0
    _same_outputs("fit", out, workspace / "refs" / "fit")


def test_stale_temporaries_of_a_dead_run_are_removed(workspace, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(workspace / "refs" / "fit", tmp_path / ".out.abc12345.tmp")
    (tmp_path / ".out.lock").write_text("999999999\n")  # a dead writer's lock
    assert main(_argv(workspace, "fit", out)) == 0
    assert _leftovers(out) == []


def _resumable_score(root: Path, out: Path, *extra: str) -> list[str]:
    """score with explanations, per-module scores and a checkpoint after every batch of 3 documents."""
    argv = _argv(root, "score", out)
    return [*argv[:argv.index("--no-explain")], "--top-k", "3", "--per-module", "--checkpoint-every", "1", *extra]


def _count_captures(monkeypatch) -> list[int]:
    import pretrace.scores.pairwise as pairwise

    calls, make = [], pairwise.document_loss

    def counting(task=None):  # every document batch the scoring pass captures computes this loss once
        loss = make(task)
        return lambda model, batch, index: calls.append(1) or loss(model, batch, index)

    monkeypatch.setattr(pairwise, "document_loss", counting)
    return calls


@pytest.mark.parametrize("fault,saved,redone", [("score-checkpoint:1", 1, 0), ("score-checkpoint:2", 2, 0),
                                                ("score-checkpoint-part:2", 2, 1)])  # killed before the explanations of part 2
def test_score_killed_mid_pass_resumes_at_its_last_save_to_identical_outputs(workspace, tmp_path, monkeypatch, capsys, fault, saved, redone):
    from pretrace.storage import checkpoint_folder
    from tiny import SENTENCES

    batches = -(-len(SENTENCES) // 3)
    reference = tmp_path / "reference"
    assert main(_resumable_score(workspace, reference)) == 0
    assert not checkpoint_folder(reference).exists()  # deleted in the commit
    out = tmp_path / "out"
    argv = _resumable_score(workspace, out)
    killed = _killed(argv, fault)
    assert killed.returncode == FAULT_EXIT_CODE, killed.stderr[-2000:]
    assert len(list(checkpoint_folder(out).glob("*-part-*"))) == saved
    calls = _count_captures(monkeypatch)
    assert main(argv) == 0, capsys.readouterr().err
    assert len(calls) == batches - saved + redone  # the saved batches are not scored again (but one its explanations miss)
    match, mismatch, errors = filecmp.cmpfiles(reference, out, ["scores.safetensors", "top_k.jsonl"], shallow=False)
    assert not mismatch and not errors, f"differ from the uninterrupted run: {mismatch + errors}"
    assert not checkpoint_folder(out).exists() and _leftovers(out) == []


def test_score_checkpoint_of_another_run_is_refused_and_kept(workspace, tmp_path, capsys):
    from pretrace.storage import checkpoint_folder
    from tiny import assert_refused

    out = tmp_path / "out"
    assert _killed(_resumable_score(workspace, out), "score-checkpoint:1").returncode == FAULT_EXIT_CODE
    assert_refused(main(_resumable_score(workspace, out, "--damping", "0.5")), capsys, "checkpoint of a different scoring run",
                   str(checkpoint_folder(out)))
    assert len(list(checkpoint_folder(out).glob("*-part-*"))) == 1


def test_fit_checkpoint_of_another_run_is_refused_and_kept(workspace, tmp_path, capsys):
    from pretrace.storage import checkpoint_folder
    from tiny import assert_refused

    out = tmp_path / "out"
    argv = _argv(workspace, "fit", out)
    assert _killed(argv, "checkpoint:1").returncode == FAULT_EXIT_CODE
    saved = sorted(p.name for p in checkpoint_folder(out).iterdir())
    assert_refused(main([*argv, "--max-length", "16"]), capsys, "checkpoint of a different fit", str(checkpoint_folder(out)))
    assert sorted(p.name for p in checkpoint_folder(out).iterdir()) == saved
