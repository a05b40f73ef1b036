"""Issue #24: pretrace never loses a user's data and never lets corrupted state into a result. One test per defect
found by the hostile sweep of 2026-12-07 (each failed on the code before this change)."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from pretrace.cli import main
from pretrace.storage import OWNER_FILE, checkpoint_folder, file_sha256
from tiny import SENTENCES, assert_refused, tiny_workspace, write_jsonl

PAIRS = [{"prompt": "the capital of france is", "completion": " paris ."}, {"prompt": "birds can", "completion": " fly ."}]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny model with factors, a fine-tuned copy with its factors, and the reference outputs of uninterrupted runs."""
    root = tiny_workspace(tmp_path_factory.mktemp("safety"))
    write_jsonl(root / "pairs.jsonl", PAIRS)
    common = ["--batch-size", "3"]
    assert main(["fit", "--model", str(root / "model"), "--data", str(root / "docs.jsonl"), "--out", str(root / "factors"), *common]) == 0
    assert main(["finetune", "--model", str(root / "model"), "--data", str(root / "pairs.jsonl"), "--out", str(root / "tuned"),
                 "--alpha", "0.1", "--epochs", "1"]) == 0
    assert main(["fit", "--model", str(root / "tuned"), "--data", str(root / "pairs.jsonl"), "--out", str(root / "tuned-factors"), *common]) == 0
    assert main(_score(root, root / "ref-scores")) == 0
    return root


def _score(root: Path, out: Path, *extra: str) -> list[str]:
    return ["score", "--model", str(root / "model"), "--factors", str(root / "factors"), "--queries", str(root / "q.jsonl"),
            "--train", str(root / "docs.jsonl"), "--out", str(out), "--batch-size", "3", "--top-k", "3", "--per-module", *extra]


def _fit(root: Path, out: Path, *extra: str, model: str = "model") -> list[str]:
    return ["fit", "--model", str(root / model), "--data", str(root / "docs.jsonl"), "--out", str(out), "--batch-size", "3", *extra]


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


# -- ownership: --overwrite replaces only what the same command wrote ---------------------------------------------

@pytest.mark.parametrize("command", ["fit", "score", "index", "finetune"])
def test_overwrite_never_deletes_a_folder_pretrace_did_not_write(ws, tmp_path, capsys, command):
    out = tmp_path / "unrelated"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    argv = {"fit": _fit(ws, out), "score": _score(ws, out),
            "index": ["index", "--model", str(ws / "model"), "--train", str(ws / "docs.jsonl"), "--out", str(out)],
            "finetune": ["finetune", "--model", str(ws / "model"), "--data", str(ws / "pairs.jsonl"), "--out", str(out), "--alpha", "0.1"]}[command]
    assert_refused(main([*argv, "--overwrite"]), capsys, "was not written by pretrace", "never replaces such a folder")
    assert (out / "notes.txt").read_text() == "precious" and sorted(p.name for p in tmp_path.iterdir()) == ["unrelated"]


def test_a_copy_of_a_model_folder_or_another_commands_result_is_never_replaced(ws, tmp_path, capsys):
    shutil.copytree(ws / "model", tmp_path / "model-copy")
    before = _snapshot(tmp_path / "model-copy")
    assert_refused(main([*_fit(ws, tmp_path / "model-copy"), "--overwrite"]), capsys, "was not written by pretrace")
    shutil.copytree(ws / "tuned", tmp_path / "tuned-copy")  # a fine-tuned model pretrace wrote: not fit's to replace
    assert_refused(main([*_fit(ws, tmp_path / "tuned-copy"), "--overwrite"]), capsys, "holds the output of `pretrace finetune`")
    assert _snapshot(tmp_path / "model-copy") == before and (tmp_path / "tuned-copy" / "model.safetensors").is_file()


def test_a_file_added_to_a_result_folder_is_never_deleted_by_overwrite(ws, tmp_path, capsys):
    out = tmp_path / "scores"
    assert main(_score(ws, out)) == 0
    (out / "my_notes.txt").write_text("mine")
    assert_refused(main([*_score(ws, out), "--overwrite"]), capsys, "1 file(s) pretrace did not write (my_notes.txt)")
    (out / "my_notes.txt").unlink()
    assert main([*_score(ws, out), "--overwrite"]) == 0


@pytest.mark.parametrize("command", ["trace", "demo", "report"])
def test_run_folders_are_never_written_into_a_folder_pretrace_did_not_write(ws, tmp_path, capsys, command):
    out = tmp_path / "unrelated"
    out.mkdir()
    (out / "report.html").write_text("my own report")
    argv = {"trace": ["trace", "--pretrained", str(ws / "model"), "--finetuned", str(ws / "tuned"), "--corpus", str(ws / "docs.jsonl"),
                      "--queries", str(ws / "pairs.jsonl"), "--out", str(out)],
            "demo": ["demo", "--out", str(out)], "report": ["report", str(ws / "ref-scores"), "--out", str(out)]}[command]
    assert_refused(main(argv), capsys, "was not written by pretrace")
    assert [p.name for p in out.iterdir()] == ["report.html"] and (out / "report.html").read_text() == "my own report"


def test_an_adapters_base_model_and_a_trak_ensemble_dir_are_inputs(ws, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    shutil.copytree(ws / "model", base)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["query_key_value"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    before = _snapshot(base)
    assert_refused(main([*_fit(ws, base, model="../" + tmp_path.name + "/adapter"), "--overwrite"]), capsys,
                   "is the input folder --model (the adapter's base model)")
    assert_refused(main(["score", "--model", str(ws / "model"), "--queries", str(ws / "q.jsonl"), "--train", str(ws / "docs.jsonl"),
                         "--out", str(tmp_path / "s"), "--method", "trak", "--trak-ensemble", "1", "--trak-ensemble-dir", str(ws / "model")]),
                   capsys, "--trak-ensemble-dir", "is the input folder --model")
    assert _snapshot(base) == before


@pytest.mark.parametrize("kind", ["loop", "dangling", "link"])
def test_a_symlinked_out_is_refused_before_any_work(ws, tmp_path, capsys, kind):
    out = tmp_path / "out"
    if kind == "loop":
        os.symlink(tmp_path / "other", out)
        os.symlink(out, tmp_path / "other")
    elif kind == "dangling":
        os.symlink(tmp_path / "nowhere", out)
    else:
        (tmp_path / "real").mkdir()
        os.symlink(tmp_path / "real", out)
    err = assert_refused(main(_fit(ws, out)), capsys, {"loop": "loop of symbolic links", "dangling": "does not exist", "link": "is a symbolic link"}[kind])
    assert "covariances" not in err and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


# -- integrity: damaged work state is recomputed (and said), never used --------------------------------------------

def _flip_sign_of_first_float(path: Path) -> None:
    """Flip the sign bit of the first float32 of a safetensors file's data (the header is left intact)."""
    data = bytearray(path.read_bytes())
    header = 8 + struct.unpack("<Q", data[:8])[0]
    data[header + 3] ^= 0x80
    path.write_bytes(bytes(data))


def _killed_after(argv: list[str], fault: str) -> None:
    import subprocess
    import sys

    env = {**os.environ, "PRETRACE_FAULT": fault, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "pretrace", *argv], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 86, done.stderr[-2000:]


def test_a_damaged_score_checkpoint_part_or_explanation_state_is_scored_again(ws, tmp_path):
    out = tmp_path / "s"
    argv = [*_score(ws, out), "--checkpoint-every", "1"]
    _killed_after(argv, "score-checkpoint:2")
    parts = sorted(checkpoint_folder(out).glob("rank0000-part-*.safetensors"))
    _flip_sign_of_first_float(parts[0])
    _flip_sign_of_first_float(checkpoint_folder(out) / "rank0000-explanations.safetensors")
    with pytest.warns(UserWarning, match="does not match the seal"):
        assert main(argv) == 0
    for name in ("scores.safetensors", "top_k.jsonl"):
        assert file_sha256(out / name) == file_sha256(ws / "ref-scores" / name), name


def test_a_damaged_fit_checkpoint_starts_its_pass_over(ws, tmp_path):
    out = tmp_path / "f"
    argv = _fit(ws, out, "--checkpoint-every", "1")
    _killed_after(argv, "checkpoint:2")
    _flip_sign_of_first_float(checkpoint_folder(out) / "covariances.safetensors")
    with pytest.warns(UserWarning, match="covariances pass starts over"):
        assert main(argv) == 0
    assert file_sha256(out / "factors.safetensors") == file_sha256(ws / "factors" / "factors.safetensors")


def test_a_damaged_shard_of_an_unfinished_index_is_built_again(ws, tmp_path):
    argv = ["index", "--model", str(ws / "model"), "--train", str(ws / "docs.jsonl"), "--batch-size", "3", "--batches-per-shard", "1"]
    assert main([*argv, "--out", str(tmp_path / "ref")]) == 0
    _killed_after([*argv, "--out", str(tmp_path / "i")], "write:3")  # index.json, two shards written
    _flip_sign_of_first_float(tmp_path / ".i.index-build" / "shard-00000.safetensors")
    with pytest.warns(UserWarning, match="the shard is computed again"):
        assert main([*argv, "--out", str(tmp_path / "i")]) == 0
    for name in ("shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"):
        assert file_sha256(tmp_path / "i" / name) == file_sha256(tmp_path / "ref" / name), name


def test_an_edited_stage_output_is_computed_again(tmp_path):
    from pretrace.stages import StageCache

    run = tmp_path / "run"
    run.mkdir()
    cache = StageCache(run)
    key = cache.key("stage", setting=1)
    assert cache.stale(key, run / "out.txt")
    (run / "out.txt").write_text("computed")
    cache.record(key)
    assert not StageCache(run).stale(key, run / "out.txt")
    (run / "out.txt").write_text("edited by hand")
    with pytest.warns(UserWarning, match="wrote other contents than it holds now"):
        assert StageCache(run).stale(key, run / "out.txt")
    assert not (run / "out.txt").exists()  # removed before the stage is computed again


def test_a_damaged_result_is_refused(ws, tmp_path, capsys):
    shutil.copytree(ws / "factors", tmp_path / "factors")
    manifest = json.loads((tmp_path / "factors" / OWNER_FILE).read_text())
    manifest["files"]["factors.json"]["sha256"] = "0" * 64
    (tmp_path / "factors" / OWNER_FILE).write_text(json.dumps(manifest))
    assert_refused(main(["inspect", str(tmp_path / "factors")]), capsys, "does not match the checksum written with it")


# -- no traceback reaches a user ----------------------------------------------------------------------------------

def test_a_full_disk_in_a_safetensors_write_is_a_refusal(ws, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def full(*args, **kwargs):
        raise safetensors.SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    monkeypatch.setattr("pretrace.storage.save_file", full)
    assert_refused(main(_fit(ws, tmp_path / "f")), capsys, "no space left on the device", "Nothing half-written was kept")
    assert not [p for p in tmp_path.iterdir() if p.name != "f" or any(p.iterdir())]


def test_multi_stage_without_a_factor_folder_is_refused_before_any_model_is_loaded(ws, tmp_path, capsys):
    argv = ["score", "--pretrained", str(ws / "model"), "--finetuned", str(ws / "tuned"), "--pretrained-factors", str(ws / "factors"),
            "--queries", str(ws / "q.jsonl"), "--train", str(ws / "docs.jsonl"), "--out", str(tmp_path / "s")]
    err = assert_refused(main(argv), capsys, "multi-stage --method ekfac needs --finetuned-factors")
    assert "Loading weights" not in err


@pytest.mark.parametrize("call,needle", [
    (lambda pretrace: pretrace.score("q.jsonl", "t.jsonl", model=3), "model must be a model folder's path or a loaded Hugging Face causal language model, not int"),
    (lambda pretrace: pretrace.fit(1, 2, 3), "model must be a model folder's path or a loaded"),
    (lambda pretrace: pretrace.score("q.jsonl", "t.jsonl", model="m", factors="f", top_k="5"), "Outputs.top_k must be int, got str"),
    (lambda pretrace: pretrace.ScoreSettings(queries="q", train="t", out="o", model="m", factors="f", alpha=True), "ScoreSettings.alpha must be float | None, got bool"),
    (lambda pretrace: pretrace.FitSettings(seed="x"), "FitSettings.seed must be int, got str"),
    (lambda pretrace: pretrace.ScoreResult(__import__("torch").zeros(1, 1), ["q"], ["d"], []).top(0), "top(k): k must be a positive integer"),
    (lambda pretrace: pretrace.finetune({"model": "m"}, "d.jsonl", alpha=0.1), "model must be a model folder's path or a loaded"),
    (lambda pretrace: pretrace.index("m/", "t.jsonl", "i/", storage_kind="exact"), "index() got unknown setting(s) 'storage_kind'"),
])
def test_the_python_api_names_the_wrong_argument(call, needle):
    import pretrace

    with pytest.raises((TypeError, pretrace.PretraceError), match=needle.replace("(", r"\(").replace(")", r"\)").replace("|", r"\|")):
        call(pretrace)


# -- options mean something or are refused ------------------------------------------------------------------------

IGNORED = [  # flags accepted in silence before; each now refused with why, before any work
    (["--alpha", "0.1"], "--alpha has no effect in single-stage scoring"),
    (["--finetuned-damping", "0.1"], "--finetuned-damping has no effect outside multi-stage scoring"),
    (["--damping", "0.1", "--damping-factor", "0.2"], "--damping and --damping-factor exclude each other"),
    (["--trak-ensemble", "2"], "--trak-ensemble has no effect with --method ekfac (read by --method trak)"),
    (["--lissa-depth", "5"], "--lissa-depth has no effect with --method ekfac (read by --method lissa)"),
    (["--shard", "queries"], "--shard has no effect without torchrun"),
    (["--shard-factors"], "--shard-factors has no effect without torchrun"),
    (["--factors-device", "cpu"], "--factors-device cpu has no effect: the model already runs on the CPU"),
    (["--id-field", "doc_id"], "has no column 'doc_id', which --id-field names"),
    (["--method", "bm25"], "--model, --factors have no effect with --method bm25"),
    (["--method", "identity"], "--factors has no effect with --method identity"),
]


@pytest.mark.parametrize("extra,needle", IGNORED, ids=[" ".join(e) for e, _ in IGNORED])
def test_an_option_without_effect_is_refused(ws, tmp_path, capsys, extra, needle):
    err = assert_refused(main(_score(ws, tmp_path / "s") + extra), capsys, needle)
    assert "Loading weights" not in err or "--id-field" in extra or "--factors-device" in extra
    assert not (tmp_path / "s").exists()


def test_scores_that_underflow_to_zero_are_refused(ws, tmp_path, capsys):
    assert_refused(main(_score(ws, tmp_path / "s", "--damping", "1e300")), capsys, "is exactly 0", "lower --damping")
    assert not (tmp_path / "s").exists()


def test_refusals_name_the_right_problem(ws, tmp_path, capsys):
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    assert_refused(main(["score", "--model", str(ws / "model"), "--factors", str(ws / "factors"), "--queries", str(ws / "q.jsonl"),
                         "--train", str(fifo), "--out", str(tmp_path / "s")]), capsys, "not a regular file (a pipe, socket or device)")
    broken = tmp_path / "broken"
    shutil.copytree(ws / "model", broken)
    (broken / "config.json").write_text("[1, 2]")
    assert_refused(main(_fit(ws, tmp_path / "f", model="../" + tmp_path.name + "/broken")), capsys, "config.json: holds a JSON list")
    err = assert_refused(main(_score(ws, tmp_path / "d", "--method", "diagonal")), capsys, "needs factors fitted with --diagonal")
    assert "query gradients" not in err and "Loading weights" in err  # refused once the model is known, before any gradient


# -- pipelines checked whole ------------------------------------------------------------------------------------

def _pipeline(root: Path, steps: list[dict]) -> Path:
    lines = ['[defaults]', 'batch_size = 3', '']
    for step in steps:
        lines += ["[[step]]"] + [f"{key} = {json.dumps(value)}" for key, value in step.items()] + [""]
    path = root / "pipeline.toml"
    path.write_text("\n".join(lines))
    return path


def _fit_step(root: Path, out: str, data: str = "docs.jsonl") -> dict:
    return {"run": "fit", "model": str(root / "model"), "data": str(root / data), "out": str(root / out)}


def _score_step(root: Path, out: str, factors: str, queries: str = "q.jsonl") -> dict:
    return {"run": "score", "model": str(root / "model"), "factors": str(root / factors), "queries": str(root / queries),
            "train": str(root / "docs.jsonl"), "out": str(root / out)}


@pytest.mark.parametrize("case,needle", [
    ("bad-queries", "step 2 (score):"), ("nan-damping", "--damping must be a finite number > 0, got nan"),
    ("same-out", "steps 1 and 2 both write --out"), ("writes-input", "lies in step 1's input model"),
])
@pytest.mark.parametrize("dry", [True, False])
def test_a_pipeline_is_checked_whole_before_its_first_step(ws, tmp_path, capsys, case, needle, dry):
    root = tmp_path
    shutil.copytree(ws / "model", root / "model")
    for name in ("docs.jsonl", "q.jsonl"):
        shutil.copy(ws / name, root / name)
    (root / "empty.jsonl").write_text("")
    first = _fit_step(root, "factors")
    second = {"bad-queries": _score_step(root, "scores", "factors", queries="empty.jsonl"),
              "nan-damping": {**_score_step(root, "scores", "factors"), "damping": float("nan")},
              "same-out": _score_step(root, "factors", "factors"),
              "writes-input": _fit_step(root, "model/sub")}[case]  # a later step writing inside step 1's --model
    if case == "nan-damping":
        second["damping"] = "nan"
    path = _pipeline(root, [first, second]).read_text().replace('damping = "nan"', "damping = nan")
    (root / "pipeline.toml").write_text(path)
    assert_refused(main(["run", str(root / "pipeline.toml"), *(["--dry-run"] if dry else [])]), capsys, needle)
    assert not (root / "factors").exists()  # step 1 never ran


def test_a_changed_input_or_a_damaged_result_reruns_its_step(ws, tmp_path, capsys):
    shutil.copytree(ws / "model", tmp_path / "model")
    for name in ("docs.jsonl", "q.jsonl"):
        shutil.copy(ws / name, tmp_path / name)
    pipeline = _pipeline(tmp_path, [_fit_step(tmp_path, "factors"), _score_step(tmp_path, "scores", "factors")])
    assert main(["run", str(pipeline)]) == 0
    write_jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": s} for i, s in enumerate(SENTENCES[:-1])])  # a changed input
    capsys.readouterr()
    assert main(["run", str(pipeline)]) == 0  # no overwrite = true needed: the pipeline replaces what it wrote
    assert "unchanged, skipped" not in capsys.readouterr().out
    assert json.loads((tmp_path / "factors" / "factors.json").read_text())["documents"] == len(SENTENCES) - 1
    _flip_sign_of_first_float(tmp_path / "factors" / "factors.safetensors")  # a damaged result: run again, not skipped
    assert main(["run", str(pipeline)]) == 0
    out = capsys.readouterr().out
    assert "does not match the sha256" in out and out.count("unchanged, skipped") == 0
    assert main(["inspect", str(tmp_path / "factors")]) == 0
