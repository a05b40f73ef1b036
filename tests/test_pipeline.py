"""`pretrace run`: a pipeline file runs the same commands as the command line, with the same settings."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pretrace.cli import build_parser, main
from pretrace.cli.run import NOT_A_STEP, RESOLVED, _arguments, _parse, _subparsers
from tiny import SENTENCES, save_tiny_model, write_jsonl

PIPELINE = """
[defaults]
max_length = 32
device = "cpu"
dtype = "float64"

[[step]]
run = "fit"
model = "model"
data = "fit.jsonl"
out = "factors"

[[step]]
run = "score"
model = "model"
factors = "factors"
queries = "q.jsonl"
train = "train.jsonl"
out = "scores"
top_k = 3

[[step]]
run = "report"
scores = "scores"
"""


@pytest.fixture()
def workspace(tmp_path, monkeypatch):
    save_tiny_model(tmp_path / "model")
    write_jsonl(tmp_path / "fit.jsonl", [{"id": str(i), "text": s} for i, s in enumerate(SENTENCES)])
    write_jsonl(tmp_path / "train.jsonl", [{"id": str(i), "text": s} for i, s in enumerate(SENTENCES[:6])])
    write_jsonl(tmp_path / "q.jsonl", [{"prompt": "paris is the capital of", "completion": " france ."}])
    (tmp_path / "pipeline.toml").write_text(PIPELINE)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_pipeline_equals_the_separate_commands_and_resumes(workspace, capsys):
    common = ["--max-length", "32", "--device", "cpu", "--dtype", "float64"]
    assert main(["fit", "--model", "model", "--data", "fit.jsonl", "--out", "cli-factors", *common]) == 0
    assert main(["score", "--model", "model", "--factors", "cli-factors", "--queries", "q.jsonl", "--train", "train.jsonl",
                 "--out", "cli-scores", "--top-k", "3", *common]) == 0
    assert main(["run", "pipeline.toml"]) == 0
    for name, expected in load_file("cli-factors/factors.safetensors").items():
        assert torch.equal(load_file("factors/factors.safetensors")[name], expected), name
    assert torch.equal(load_file("scores/scores.safetensors")["scores"], load_file("cli-scores/scores.safetensors")["scores"])
    assert (workspace / "scores" / "report.html").is_file()
    record = json.loads((workspace / "scores" / RESOLVED).read_text())
    assert [s["run"] for s in record["step"]] == ["fit", "score", "report"] and set(record["step_digests"]) == {"score:scores", "report:scores"}
    assert record["step"][1]["checkpoint_every"] == 50 and record["step"][1]["damping_factor"] is None  # defaults are filled in

    capsys.readouterr()
    assert main(["run", "pipeline.toml"]) == 0  # nothing changed: every step skipped
    assert capsys.readouterr().out.count("unchanged, skipped") == 3
    write_jsonl(workspace / "train.jsonl", [{"id": str(i), "text": s} for i, s in enumerate(SENTENCES[:5])])
    (workspace / "pipeline.toml").write_text(PIPELINE.replace('top_k = 3', 'top_k = 3\noverwrite = true'))
    assert main(["run", "pipeline.toml"]) == 0  # a changed training file: score and report rerun, fit does not
    out = capsys.readouterr().out
    assert "fit -> factors (unchanged, skipped)" in out and "step 2/3: pretrace score\n" in out and "step 3/3: pretrace report\n" in out
    assert load_file("scores/scores.safetensors")["scores"].shape == (1, 5)


def test_the_resolved_pipeline_replays_as_written(workspace, capsys):
    assert main(["run", "pipeline.toml"]) == 0
    capsys.readouterr()
    assert main(["run", "pipeline.toml", "--dry-run"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(["run", str(workspace / "factors" / RESOLVED), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out) == first


@pytest.mark.parametrize("text,message", [
    ('[[step]]\nrun = "fit"\nmodel = "m"\ndata = "d"\nout = "o"\nlearning_rate = 1', "`pretrace fit` has no setting 'learning_rate'; its settings are"),
    ('[[step]]\nrun = "fly"', "run = 'fly' is not a pipeline command"),
    ('[[step]]\nrun = "demo"', "run = 'demo' is not a pipeline command"),
    ('[defaults]\nalpha2 = 1', "\\[defaults\\] 'alpha2': no step has such a setting"),
    ('[[step]]\nrun = "fit"\nmodel = "m"\ndata = "d"', "step 4 \\(fit\\): the following arguments are required: --out"),
    ('[[step]]\nrun = "fit"\nmodel = "m"\ndata = "d"\nout = "o"\nbatch_size = "big"', "--batch-size 'big': pass a number of sequences, or 'auto'"),
    ('[[step]]\nrun = "fit"\nmodel = "m"\ndata = "d"\nout = "o"\noverwrite = "yes"', "'overwrite' is true or false"),
    ('[[steps]]\nrun = "fit"', "unknown pipeline tables \\['steps'\\]"),
    ('[[step]\n', "not a valid TOML pipeline"),
])
def test_bad_pipelines_are_refused_before_any_step_runs(workspace, capsys, text, message):
    pipeline = PIPELINE.replace("[defaults]", text) if text.startswith("[defaults]") else PIPELINE + "\n" + text
    (workspace / "bad.toml").write_text(pipeline)
    before = sorted(p.name for p in workspace.iterdir())
    assert main(["run", "bad.toml"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert __import__("re").search(message, err), err
    assert sorted(p.name for p in workspace.iterdir()) == before  # not even the first step ran


def test_every_flag_of_every_command_is_a_pipeline_key_and_back():
    """Each command's fully resolved settings, written back as pipeline keys, parse to the same namespace."""
    commands = _subparsers(build_parser())
    for command, parser in commands.items():
        if command in NOT_A_STEP:
            continue
        required = [a for a in parser._actions if (a.required or not a.option_strings) and a.dest != "help"]
        minimal = []
        for action in required:
            minimal += action.option_strings[:1] + ["1" if action.type in (int, float) else "x"]
        parsed = _parse(parser, minimal, command)
        keys = {k: v for k, v in vars(parsed).items() if k not in ("handler", "check")}
        assert vars(_parse(parser, _arguments(command, parser, keys, command), command)) == vars(parsed), command
