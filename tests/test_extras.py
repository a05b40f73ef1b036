"""A missing optional dependency is refused with the `pip install` line of the extra that adds it, before any work."""

import importlib.util

import pytest

from pretrace.cli import main
from pretrace.errors import PretraceError
from pretrace.extras import EXTRA_OF, require


def _hide(monkeypatch, *hidden: str) -> None:
    """find_spec answers None for `hidden`, as on a machine without them."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name in hidden else real(name, *a, **k))


def test_every_extra_named_exists_in_pyproject():
    import tomllib
    from pathlib import Path

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(EXTRA_OF.values()) <= set(extras)
    assert {"retrieval", "trainer", "adapters", "formats", "index", "all"} <= set(extras)


def test_require_names_the_missing_modules_and_their_extras(monkeypatch):
    _hide(monkeypatch, "faiss", "peft")
    require("torch", purpose="nothing")
    with pytest.raises(PretraceError, match=r"needs faiss, peft, not installed here: pip install 'pretrace\[adapters,index\]'"):
        require("torch", "faiss", "peft", purpose="this")


def test_the_demo_without_its_extras_is_refused_before_writing_anything(monkeypatch, tmp_path, capsys):
    _hide(monkeypatch, "bm25s")
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'pretrace[retrieval]'" in err and "Traceback" not in err
    assert not (tmp_path / "demo").exists()


def test_an_unchecked_import_of_an_optional_module_is_still_named_with_its_extra(monkeypatch, capsys):
    import pretrace.cli.inspect as inspect_command

    def fails(args):
        raise ModuleNotFoundError("No module named 'faiss'", name="faiss")

    monkeypatch.setattr(inspect_command, "run", fails)  # register() binds the handler when main builds its parser
    assert main(["inspect", "."]) == 2
    err = capsys.readouterr().err
    assert "faiss is not installed here" in err and "pip install 'pretrace[index]'" in err and "internal error" not in err
