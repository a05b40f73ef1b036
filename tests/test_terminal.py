"""Terminal conventions: -q/-v/--no-progress on every command, TQDM_DISABLE honoured, plain progress lines off a
terminal, and `score` printing a summary unless asked for each query's tops."""

import io
import json
import os

import pytest
import torch

from pretrace.cli import COMMANDS, build_parser, main
from pretrace.progress import PlainLines, progress_bar
from tiny import SENTENCES, save_tiny_model


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("terminal")
    save_tiny_model(root / "model", "gpt2", dtype=torch.float32)
    (root / "docs.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": s}) + "\n" for i, s in enumerate(SENTENCES)))
    (root / "q.jsonl").write_text("".join(json.dumps({"id": f"q{i}", "prompt": p, "completion": c}) + "\n"
                                          for i, (p, c) in enumerate([("paris is the capital of", " france ."), ("the cat sat on", " the mat .")])))
    assert main(["fit", "-q", "--model", str(root / "model"), "--data", str(root / "docs.jsonl"), "--out", str(root / "factors"), "--batch-size", "3"]) == 0
    return root


def _score(root, out, *extra):
    return main(["score", "--model", str(root / "model"), "--factors", str(root / "factors"), "--queries", str(root / "q.jsonl"),
                 "--train", str(root / "docs.jsonl"), "--out", str(out), "--top-k", "3", *extra])


def test_every_command_takes_the_same_output_flags():
    parser = build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        flags = {flag for action in sub._actions for flag in action.option_strings}
        assert {"-q", "--quiet", "-v", "--verbose", "--no-progress"} <= flags, name
    assert set(parser._subparsers._group_actions[0].choices) == set(COMMANDS)


def test_tqdm_disable_turns_every_bar_off(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert progress_bar(range(3), enabled=True).disable
    monkeypatch.setenv("TQDM_DISABLE", "0")
    assert not progress_bar(range(3), enabled=True).disable
    assert progress_bar(range(3), enabled=False).disable


def test_off_a_terminal_progress_is_plain_lines():
    stream = io.StringIO()
    for _ in progress_bar(range(5), desc="work", file=PlainLines(stream), mininterval=0, miniters=1):
        pass
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) >= 2 and all(line.startswith("work:") for line in lines) and "5/5" in lines[-1]


def test_score_prints_a_summary_and_tops_only_when_asked(workspace, tmp_path, capsys):
    assert _score(workspace, tmp_path / "a") == 0
    out = capsys.readouterr().out
    assert "scores [2 queries x" in out and "--show-top" in out and "query q0" not in out
    assert _score(workspace, tmp_path / "b", "--show-top", "2") == 0
    out = capsys.readouterr().out
    assert out.count("query q") == 2 and "    1. " in out and "    3. " not in out


def test_quiet_prints_nothing_and_restores_the_process(workspace, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert _score(workspace, tmp_path / "q", "-q") == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "scoring documents" not in captured.err and "memory plan" not in captured.err
    assert (tmp_path / "q" / "top_k.jsonl").is_file()
    assert "TQDM_DISABLE" not in os.environ  # main can be called again in the same process, unchanged
    assert main(["inspect", "-q", str(tmp_path / "q")]) == 0 and "method ekfac" in capsys.readouterr().out


def test_negative_show_top_is_refused_before_any_work(workspace, tmp_path, capsys):
    assert _score(workspace, tmp_path / "n", "--show-top", "-1") == 2
    assert "--show-top -1" in capsys.readouterr().err and not (tmp_path / "n").exists()


def test_a_logged_run_has_no_redraws_and_no_library_loading_bars(workspace, tmp_path):
    """stderr to a file (no terminal): plain lines only, and transformers' weight-loading bar is quieted."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY")}
    done = subprocess.run([sys.executable, "-m", "pretrace", "fit", "--model", str(workspace / "model"), "--data", str(workspace / "docs.jsonl"),
                           "--out", str(tmp_path / "factors"), "--batch-size", "3"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "Loading weights" not in done.stderr
    assert done.stderr.count("\n") < 40


def test_plain_lines_are_rate_limited_even_when_a_loop_refreshes_every_step():
    stream = io.StringIO()
    bar = progress_bar(total=1000, desc="train", file=PlainLines(stream), mininterval=3600)
    for step in range(1000):
        bar.set_postfix(loss=step)  # a refresh request per step, as the training loop makes
        bar.update()
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) <= 3 and "1000/1000" in lines[-1]


def test_every_flag_with_a_default_shows_it_exactly_once():
    """`--help` of every command (and every benchmark): each option with a default says it once, booleans included."""
    parser = build_parser()
    commands = dict(parser._subparsers._group_actions[0].choices)
    bench = commands.pop("bench")
    commands.update({f"bench {name}": sub for name, sub in bench._subparsers._group_actions[0].choices.items()})
    for name, sub in commands.items():
        for action in sub._actions:
            if not action.option_strings or action.help is None or action.dest == "help":
                continue
            shown = action.help.count("(default:")
            if action.default not in (None, False) or (isinstance(action.default, bool) and "BooleanOptional" in type(action).__name__):
                assert shown == 1, (name, action.option_strings, action.help)
            assert shown <= 1, (name, action.option_strings, action.help)
