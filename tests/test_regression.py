"""Outputs are unchanged by the engine redesign: factors of both stages and every method's scores (14 single-stage
methods, multi-stage EK-FAC and K-FAC) on a fixed tiny problem equal the references that the code as it stood before
it (commit a47fca1) wrote with `tests/fixtures/regression/generate.py` — bit for bit when measured on 2026-12-01."""

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
