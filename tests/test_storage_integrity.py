"""Stored factors, scores and indexes are verified on load (sha256, shapes, finite, Λ ≥ 0, fingerprint): a damaged
or malformed folder is refused with a message naming the file and the fix, never a traceback or NaN scores."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pretrace.cli import main
from pretrace.storage import OWNER_FILE, file_sha256, mark_folder
from tiny import assert_refused, tiny_workspace

MLP = "gpt_neox.layers.1.mlp.dense_h_to_4h"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    tiny_workspace(root)
    common = ["--model", str(root / "model"), "--batch-size", "4"]
    assert main(["fit", *common, "--data", str(root / "docs.jsonl"), "--out", str(root / "factors")]) == 0
    assert main(["index", *common, "--train", str(root / "docs.jsonl"), "--out", str(root / "index")]) == 0
    assert main(["score", *common, "--factors", str(root / "factors"), "--queries", str(root / "q.jsonl"), "--train", str(root / "docs.jsonl"),
                 "--out", str(root / "scores"), "--no-explain"]) == 0
    return root


def _score(root: Path, out: Path, factors: Path, *extra: str) -> int:
    return main(["score", "--model", str(root / "model"), "--batch-size", "4", "--factors", str(factors), "--queries", str(root / "q.jsonl"),
                 "--train", str(root / "docs.jsonl"), "--out", str(out), "--no-explain", *extra])




def _copy(workspace: Path, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(workspace / name, tmp_path / name))


def _flip_bits(path: Path, flips: int) -> None:
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    for i in range(flips):  # low mantissa bits of tensor data: the values stay finite
        data[header + 4 * (37 * i % ((len(data) - header) // 4))] ^= 0x01
    path.write_bytes(bytes(data))


def _rewrite_factors(folder: Path, edit) -> None:
    """Edit the tensors and record their new hash, so the check under test is not the sha256 one."""
    tensors = load_file(str(folder / "factors.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "factors.safetensors"))
    mark_folder(folder, "fit", manifest=True)


def _edit_json(path: Path, edit, command: str | None = None) -> None:
    """Edit a JSON file; with `command`, record the folder's new manifest, so the check under test is not the sha256 one."""
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    if command is not None:
        mark_folder(path.parent, command, manifest=True)


def test_finite_bit_flips_in_factors_are_detected(workspace, tmp_path, capsys):
    factors = _copy(workspace, tmp_path, "factors")
    _flip_bits(factors / "factors.safetensors", 10)
    before = file_sha256(factors / "factors.safetensors")
    assert_refused(_score(workspace, tmp_path / "s", factors), capsys, "factors.safetensors", "sha256", "recompute the factors")
    assert file_sha256(factors / "factors.safetensors") == before and not (tmp_path / "s").exists()


@pytest.mark.parametrize("edit,needle", [
    (lambda t: t[f"{MLP}.lambda"].neg_(), "negative eigenvalues"),
    (lambda t: t.update({f"{MLP}.lambda": t[f"{MLP}.lambda"].round().to(torch.int64)}), "not floating point"),
    (lambda t: t.update({f"{MLP}.activation_eigenvectors": t[f"{MLP}.activation_eigenvectors"][:, :-1].contiguous()}), "has shape"),
])
def test_invalid_factor_tensors_areassert_refused(workspace, tmp_path, capsys, edit, needle):
    factors = _copy(workspace, tmp_path, "factors")
    _rewrite_factors(factors, edit)
    assert_refused(_score(workspace, tmp_path / "s", factors), capsys, MLP, needle, "recompute the factors")


def test_factors_without_a_model_fingerprint_areassert_refused(workspace, tmp_path, capsys):
    factors = _copy(workspace, tmp_path, "factors")
    _edit_json(factors / "factors.json", lambda meta: {k: v for k, v in meta.items() if k != "model_fingerprint"}, "fit")
    assert_refused(_score(workspace, tmp_path / "s", factors), capsys, "no model fingerprint")


@pytest.mark.parametrize("edit,needle", [
    (lambda meta: [meta], "JSON list, not an object"),
    (lambda meta: {**meta, "modules": list(meta["modules"])}, "'modules' is missing or not an object"),
    (lambda meta: {**meta, "modules": {k: {"shape": v["shape"]} for k, v in meta["modules"].items()}}, "'n_blocks'"),
    (lambda meta: {**meta, "format_version": 1}, "recompute the factors"),
])
def test_malformed_factors_json_isassert_refused(workspace, tmp_path, capsys, edit, needle):
    factors = _copy(workspace, tmp_path, "factors")
    _edit_json(factors / "factors.json", edit, "fit")
    assert_refused(main(["inspect", str(factors)]), capsys, "factors.json", needle)


def test_an_edited_factors_json_or_a_missing_manifest_is_refused(workspace, tmp_path, capsys):
    factors = _copy(workspace, tmp_path, "factors")
    _edit_json(factors / "factors.json", lambda meta: {**meta, "documents": meta["documents"] + 1})
    assert_refused(main(["inspect", str(factors)]), capsys, "factors.json", "sha256", "recompute the factors")
    (factors / OWNER_FILE).unlink()
    assert_refused(main(["inspect", str(factors)]), capsys, str(factors), "no .pretrace.json manifest", "recompute the factors")


def test_damaged_scores_areassert_refused(workspace, tmp_path, capsys):
    scores = _copy(workspace, tmp_path, "scores")
    _flip_bits(scores / "scores.safetensors", 1)
    assert_refused(main(["inspect", str(scores)]), capsys, "scores.safetensors", "sha256", "recompute the scores")


def test_damaged_index_shard_isassert_refused(workspace, tmp_path, capsys):
    index = _copy(workspace, tmp_path, "index")
    _flip_bits(index / "shard-00000.safetensors", 1)
    assert_refused(_score(workspace, tmp_path / "s", workspace / "factors", "--index", str(index)), capsys, "shard-00000.safetensors", "does not match the seal")


@pytest.mark.parametrize("edit,needle", [(lambda meta: [meta], "JSON list, not an object"), (lambda meta: {**meta, "shards": {}}, "checksum")])
def test_malformed_index_json_isassert_refused(workspace, tmp_path, capsys, edit, needle):
    index = _copy(workspace, tmp_path, "index")
    _edit_json(index / "index.json", edit, "index")
    assert_refused(_score(workspace, tmp_path / "s", workspace / "factors", "--index", str(index)), capsys, "index.json", needle, "rebuild the index")


def test_fit_refuses_to_write_non_finite_factors(workspace, tmp_path, capsys):
    """float16 cannot hold this module's activation covariance (~1e5): nothing is written, the fix is named."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(workspace / "model")
    with torch.no_grad():
        model.get_parameter("gpt_neox.layers.1.post_attention_layernorm.weight").mul_(300)
    model.save_pretrained(tmp_path / "big")
    AutoTokenizer.from_pretrained(workspace / "model").save_pretrained(tmp_path / "big")
    code = main(["fit", "--model", str(tmp_path / "big"), "--data", str(workspace / "docs.jsonl"), "--out", str(tmp_path / "f"), "--factor-dtype", "float16"])
    assert_refused(code, capsys, MLP, "NaN or infinite", "--factor-dtype float32")
    assert not (tmp_path / "f").exists()
    code = main(["fit", "--model", str(tmp_path / "big"), "--data", str(workspace / "docs.jsonl"), "--out", str(tmp_path / "f"), "--factor-dtype", "float32"])
    assert code == 0 and not any(p.name.startswith(".f.") for p in tmp_path.iterdir())  # the suggested fix resumes from the checkpoint


def test_writes_are_fsynced_and_renamed_in(tmp_path, monkeypatch):
    """A file's data and then its folder's entry reach the disk: without both a crash can leave an empty file."""
    import os
    import stat

    from pretrace.storage import write_json

    synced, real = [], os.fsync

    def recording(descriptor):
        synced.append("folder" if stat.S_ISDIR(os.fstat(descriptor).st_mode) else "file")
        return real(descriptor)

    monkeypatch.setattr(os, "fsync", recording)
    write_json(tmp_path / "a.json", {"x": 1})
    assert synced == ["file", "folder"] and json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_failed_swap_keeps_the_old_result(tmp_path, monkeypatch):
    """Issue #18: the old folder was deleted before the new one was renamed in; a failure there lost both."""
    import os

    from pretrace.storage import atomic_directory

    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    mark_folder(final, "fit", manifest=True)
    def guarded(real):
        def rename(source, target, *args, **kwargs):
            if str(source).endswith(".tmp") and Path(target) == final:
                raise OSError(28, "No space left on device")
            return real(source, target, *args, **kwargs)

        return rename

    monkeypatch.setattr(os, "rename", guarded(os.rename))
    monkeypatch.setattr(os, "replace", guarded(os.replace))
    with pytest.raises(OSError):
        with atomic_directory(final, "fit", overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (final / "old.txt").read_text() == "old"
    assert sorted(p.name for p in final.iterdir()) == [OWNER_FILE, "old.txt"]
