"""Outputs are unchanged by the engine redesign: factors of both stages and every method's scores (14 single-stage
methods, multi-stage EK-FAC and K-FAC) on a fixed tiny problem equal the references that the code as it stood before
it (commit a47fca1) wrote with `tests/fixtures/regression/generate.py` — bit for bit when measured on 2026-12-01 and
again on 2026-12-07.

The references depend on the CPU as well as the code: the fine-tune factors of this problem come from 5 tokens, fewer
than any module's width, so their eigenvectors in the degenerate (null) eigenspaces, EK-FAC's corrected eigenvalues in
that basis and the multi-stage EK-FAC scores follow the machine's rounding (up to 8% apart between two Xeons). They were
rewritten on 2026-12-07 on the CI's CPU type by the old commits themselves (`reference.json` says how)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures" / "regression"
sys.path.insert(0, str(FIXTURES))

from generate import problem, run  # noqa: E402


def test_factors_and_every_methods_scores_equal_the_references_written_before_the_redesign(tmp_path):
    reference = load_file(str(FIXTURES / "reference.safetensors"))
    assert sorted(reference) == json.loads((FIXTURES / "reference.json").read_text())["outputs"]
    problem(tmp_path)
    outputs = run(tmp_path)
    assert sorted(outputs) == sorted(reference)
    for name, expected in reference.items():
        # float64 throughout and the same operations: equal to rounding (measured: bit-identical)
        torch.testing.assert_close(outputs[name], expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()), msg=name)


def _assert_same_rows(actual, expected, where: str) -> None:
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and sorted(actual) == sorted(expected), where
        for key in expected:
            _assert_same_rows(actual[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), where
        if expected and all(isinstance(v, float) for v in expected):
            torch.testing.assert_close(torch.tensor(actual, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                                       rtol=1e-9, atol=1e-15, msg=where)
        else:
            for i, (a, e) in enumerate(zip(actual, expected)):
                _assert_same_rows(a, e, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert isinstance(actual, float) and abs(actual - expected) <= 1e-9 * abs(expected) + 1e-15, (where, actual, expected)
    else:
        assert actual == expected, (where, actual, expected)


def test_explanations_equal_the_references_written_before_they_were_streamed(tmp_path):
    """The top documents and their per-token and per-module contributions, of `score` (EK-FAC, identity, K-FAC with
    low-rank queries, multi-stage) and of `trace` (top among each query's candidates), as the code wrote them when
    explanations rescored the top documents in a second pass (commit 3e9c13f)."""
    from generate import explanations

    reference = json.loads((FIXTURES / "explanations.json").read_text())["rows"]
    problem(tmp_path)
    run(tmp_path)
    rows = explanations(tmp_path)
    assert sorted(rows) == sorted(reference)
    for name, expected in reference.items():
        _assert_same_rows(rows[name], expected, name)
