"""The documentation site builds with `mkdocs build --strict` (warnings are errors: a broken link or anchor, a page
missing from the nav, a docstring mkdocstrings cannot render), and its generated pages say what the code says."""

from __future__ import annotations

import argparse
import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None,
                                reason="mkdocs is not installed: pip install 'pretrace[docs]' (the dev lock has it) to build the site")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's end-of-life banner, not a build warning
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
                             "--site-dir", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    return out


def _text(page: Path) -> str:
    """A built page's text: tags dropped, entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text(encoding="utf-8")))


def test_the_site_builds_strictly_with_every_page(site):
    for page in ("index.html", "quickstart/index.html", "concepts/index.html", "cli/index.html", "api/index.html",
                 "benchmarks/index.html", "howto/trainer/index.html", "howto/adapters/index.html", "howto/data/index.html",
                 "howto/distributed/index.html", "howto/corpus-store/index.html"):
        assert (site / page).is_file(), page
    assert (site / "quality_vs_cost.png").is_file() and (site / "report.png").is_file()
    assert not list(site.rglob("gen_*.py")), "the build hooks are not pages of the site"


def test_the_cli_reference_is_every_parser_help(site):
    """Every command, bench's benchmarks included, with every one of its flags, as its own parser prints them."""
    from pretrace.cli import COMMANDS, build_parser

    text = _text(site / "cli" / "index.html")
    assert "<!-- cli-reference -->" not in text

    seen = []

    def check(parser, name):
        seen.append(name)
        assert f"usage: {name}" in text, name
        for action in parser._actions:
            for flag in action.option_strings:
                assert flag in text, f"{name} {flag}"
            if isinstance(action, argparse._SubParsersAction):
                for child, subparser in action.choices.items():
                    check(subparser, f"{name} {child}")

    check(build_parser(), "pretrace")
    assert {f"pretrace {command}" for command in COMMANDS} <= set(seen)
    assert "pretrace bench quality-vs-cost" in seen


def test_the_api_reference_renders_docstrings_and_settings(site):
    text = _text(site / "api" / "index.html")
    for name in ("fit", "score", "finetune", "index", "trace", "load_scores", "ScoreResult", "Factors", "Task", "PretraceCallback",
                 "FitSettings", "ScoreSettings", "FinetuneSettings", "IndexSettings", "TraceSettings", "ModelOptions"):
        assert re.search(rf"\b{name}\b", text), name
    assert "EK-FAC factors of model on data" in text  # pretrace.api.fit's docstring
    assert "damping_factor" in text and "--damping-factor" in text  # the generated settings tables
    assert "<!-- settings:" not in text and "<!-- methods -->" not in text
    from pretrace.methods.config import METHODS

    for method in METHODS.values():
        assert method.summary in text, method.name
