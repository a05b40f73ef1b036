"""Every command checks its --out before any work: never an input folder (nor inside one, nor holding one), never
a file, writable, locked against a second live writer; `index` no longer writes into any existing folder."""

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from pretrace.cli import main
from pretrace.storage import file_sha256
from tiny import SENTENCES, assert_refused, save_tiny_model, write_jsonl

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    save_tiny_model(root / "inputs" / "model", "gpt_neox", dtype=torch.float32)
    write_jsonl(root / "docs.jsonl", [{"id": f"d{i}", "text": s} for i, s in enumerate(SENTENCES)])
    write_jsonl(root / "q.jsonl", [{"prompt": "paris is the capital of", "completion": " france ."}])
    assert main(["fit", "--model", str(root / "inputs" / "model"), "--data", str(root / "docs.jsonl"), "--out", str(root / "inputs" / "factors")]) == 0
    return root


def _argv(root: Path, command: str, out: Path, model: Path | None = None) -> list[str]:
    model = str(model or root / "inputs" / "model")
    if command == "fit":
        return ["fit", "--model", model, "--data", str(root / "docs.jsonl"), "--out", str(out)]
    if command == "index":
        return ["index", "--model", model, "--train", str(root / "docs.jsonl"), "--out", str(out)]
    if command == "finetune":
        return ["finetune", "--model", model, "--data", str(root / "q.jsonl"), "--out", str(out), "--alpha", "0.1", "--epochs", "1"]
    return ["score", "--model", model, "--factors", str(root / "inputs" / "factors"), "--queries", str(root / "q.jsonl"),
            "--train", str(root / "docs.jsonl"), "--out", str(out), "--no-explain"]


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}




@pytest.mark.parametrize("command,out,extra,needle", [
    ("fit", "inputs/model", ["--overwrite"], "is the input folder --model"),
    ("finetune", "inputs/model", ["--overwrite"], "is the input folder --model"),
    ("score", "inputs/factors", ["--overwrite"], "is the input folder --factors"),
    ("index", "inputs/model", [], "is the input folder --model"),
    ("fit", "inputs/model/factors", [], "is inside the input folder --model"),
    ("fit", "inputs", ["--overwrite"], "contains the input --model"),
    ("score", ".", ["--overwrite"], "contains the input --model"),
])
def test_an_input_is_never_the_output(workspace, capsys, command, out, extra, needle):
    before = _snapshot(workspace / "inputs")
    assert_refused(main(_argv(workspace, command, workspace / out) + extra), capsys, needle)
    assert _snapshot(workspace / "inputs") == before


def test_index_refuses_a_non_empty_folder_without_overwrite(workspace, tmp_path, capsys):
    assert main(_argv(workspace, "index", tmp_path / "out")) == 0
    assert_refused(main(_argv(workspace, "index", tmp_path / "out")), capsys, "already exists and is not empty", "--overwrite")
    assert main(_argv(workspace, "index", tmp_path / "out") + ["--overwrite"]) == 0
    assert (tmp_path / "out" / "index.json").is_file()


@pytest.mark.parametrize("command", ["fit", "score", "index", "finetune"])
def test_an_existing_file_as_out_isassert_refused(workspace, tmp_path, capsys, command):
    (tmp_path / "out").write_text("not a folder")
    assert_refused(main(_argv(workspace, command, tmp_path / "out")), capsys, "exists and is not a folder")
    assert (tmp_path / "out").read_text() == "not a folder"


def _unwritable(tmp_path: Path) -> Path:
    """A folder this process cannot create files in (root ignores permissions: then /sys, where nobody can)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    for candidate in (folder, Path("/sys")):
        try:
            tempfile.TemporaryFile(dir=candidate).close()
        except OSError:
            return candidate
    pytest.skip("no unwritable folder on this machine")


@pytest.mark.parametrize("command", ["fit", "score", "index", "finetune"])
def test_an_unwritable_out_is_refused_before_any_work(workspace, tmp_path, capsys, command):
    # the model does not exist: the --out problem must be found before the model is even looked at
    assert_refused(main(_argv(workspace, command, _unwritable(tmp_path) / "out", model=tmp_path / "no-model")), capsys, "cannot write in", "writable --out")


def test_a_second_live_writer_is_refused_and_a_dead_ones_lock_taken_over(workspace, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pretrace.storage import output_folder\n"
         f"with output_folder({str(out)!r}, False, command='fit'):\n    print('locked', flush=True); sys.stdin.read()"],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert_refused(main(_argv(workspace, "fit", out)), capsys, "another pretrace process", f"pid {holder.pid}")
    finally:
        holder.kill()  # dies holding the lock: its lock file stays behind
        holder.wait()
    assert (tmp_path / ".out.lock").read_text().strip() == str(holder.pid)
    assert main(_argv(workspace, "fit", out)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("out", [".", "..", "/"])
def test_out_must_name_a_folder(workspace, capsys, out):
    assert_refused(main(_argv(workspace, "fit", Path(out))), capsys, "name the output folder itself")


def test_a_full_disk_is_refused_cleanly_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    """ENOSPC in the middle of writing the result: exit 2 with what to do, no traceback, no half-written output."""
    import errno

    import pretrace.storage as storage
    from pretrace.cli import main
    from tiny import SENTENCES, save_tiny_model, write_jsonl

    save_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": s} for s in SENTENCES])

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".factors.tmp"))

    monkeypatch.setattr(storage, "save_file", full)
    assert main(["fit", "--model", str(tmp_path / "model"), "--data", data, "--out", str(tmp_path / "factors"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "no space left on the device" in err and "free space or choose another --out" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "model"]
