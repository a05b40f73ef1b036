"""The public front door: lazy, versioned, and every exported name is the object its module defines."""

import importlib
import subprocess
import sys
from importlib import metadata

import pytest

import pretrace


def test_importing_pretrace_loads_no_torch():
    code = "import sys, pretrace; print(pretrace.__version__); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [metadata.version("pretrace"), "False"]


@pytest.mark.parametrize("name", sorted(pretrace._EXPORTS))
def test_each_export_is_its_modules_own_object(name):
    assert getattr(pretrace, name) is getattr(importlib.import_module(pretrace._EXPORTS[name]), name)
    assert name in dir(pretrace)


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'fitt'"):
        pretrace.fitt  # noqa: B018


def test_the_documented_python_examples_run_as_written(tmp_path, monkeypatch, sentences):
    """The user guide's API blocks, then the README's, executed verbatim against a tiny model folder with the names
    they use."""
    import re
    from pathlib import Path

    from tiny import save_tiny_model, write_jsonl

    root = Path(__file__).parents[1]
    guide, readme = (root / "docs" / "guide.md").read_text(), (root / "README.md").read_text()
    block = re.search(r"```python\n(import pretrace.*?)```", guide, re.S).group(1)
    save_tiny_model(tmp_path / "model")
    write_jsonl(tmp_path / "train.jsonl", [{"id": str(i), "text": s} for i, s in enumerate(sentences)])
    write_jsonl(tmp_path / "q.jsonl", [{"prompt": "paris is the capital of", "completion": " france ."}])
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(block, "docs/guide.md", "exec"), namespace)
    assert namespace["result"].scores.shape == (1, len(sentences))
    assert (tmp_path / "scores" / "scores.safetensors").is_file() and (tmp_path / "factors" / "factors.json").is_file()
    readme_block = re.search(r"```python\n(import pretrace.*?)```", readme, re.S).group(1)
    loaded = {}
    exec(compile(readme_block, "README.md", "exec"), loaded)  # it reads back the scores/ folder the guide's block wrote
    assert loaded["result"].scores.shape == (1, len(sentences))
    written = sorted(tmp_path.iterdir())
    notebook = re.search(r"```python\n(from transformers import.*?)```", guide, re.S).group(1)
    exec(compile(notebook, "docs/guide.md", "exec"), namespace)
    assert namespace["result"].scores.shape == (1, 2) and bool(namespace["result"].scores.any())
    assert sorted(tmp_path.iterdir()) == written  # the notebook block writes nothing


def test_pretrace_help_lists_every_command_without_importing_torch():
    code = ("import sys\nfrom pretrace.cli import COMMANDS, main\ntry:\n    main(['--help'])\nexcept SystemExit as exit:\n"
            "    assert exit.code == 0\nprint('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    from pretrace.cli import COMMANDS

    assert result.stdout.splitlines()[-1] == "False"
    assert all(f"{name}  " in result.stdout or f"{name}\n" in result.stdout for name in COMMANDS)


BENCHMARKS = ("quality-vs-cost", "fact-tracing", "multistage-lds")


def _help_argvs() -> list:
    from pretrace.cli import COMMANDS

    return [(name,) for name in COMMANDS] + [("bench", name) for name in BENCHMARKS]


@pytest.mark.parametrize("argv", _help_argvs(), ids=" ".join)
def test_every_command_help_answers_without_importing_torch(argv):
    """`pretrace COMMAND --help` builds the command's flags from its settings dataclasses: they live in torch-free
    modules, so help answers in a fraction of a second."""
    code = (f"import sys\nfrom pretrace.cli import main\ntry:\n    main({[*argv, '--help']!r})\nexcept SystemExit as exit:\n"
            "    assert exit.code == 0, exit.code\nprint(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("usage: pretrace")
    assert result.stdout.splitlines()[-1] == "[]"
