"""Every scoring method under torchrun (2 processes, gloo) equals one process: multi-stage EK-FAC, the
curvature solvers (exact, CG, LiSSA, Arnoldi) and TRAK, with the documents sharded over the ranks."""

from __future__ import annotations

import pytest

from pretrace.scores.io import load_scores
from pretrace.training import FinetuneSettings, finetune
from test_distributed import BATCH_SIZE, COMMON, _max_relative_difference, _torchrun, workspace  # noqa: F401  (fixture)

CASES = {
    "multi-stage-ekfac": ["--pretrained", "model", "--finetuned", "finetuned", "--pretrained-factors", "factors",
                          "--finetuned-factors", "factors-ft"],
    "exact": ["--model", "model", "--method", "exact", "--damping", "0.01"],
    "cg": ["--model", "model", "--method", "cg", "--damping", "0.01", "--iterations", "50"],
    "lissa": ["--model", "model", "--method", "lissa", "--damping", "0.1", "--lissa-depth", "20"],
    "arnoldi": ["--model", "model", "--method", "arnoldi", "--arnoldi-rank", "5", "--arnoldi-iterations", "10"],
    "trak": ["--model", "model", "--method", "trak", "--projection-dim", "16"],
}
SLOW = {"lissa", "arnoldi", "trak"}


@pytest.fixture(scope="module")
def finetuned(workspace):  # noqa: F811
    from pretrace.cli import main

    finetune(FinetuneSettings(model=str(workspace / "model"), data=str(workspace / "queries.jsonl"), out=str(workspace / "finetuned"),
                              alpha=0.1, lr=1e-3, epochs=1, batch_size=BATCH_SIZE, device="cpu"), progress=False)
    assert main(["fit", "--model", str(workspace / "finetuned"), "--data", str(workspace / "queries.jsonl"),
                 "--out", str(workspace / "factors-ft"), *COMMON]) == 0
    return workspace


@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) if m in SLOW else m for m in CASES])
def test_method_under_torchrun_equals_one_process(finetuned, method):
    from pretrace.cli import main

    root, arguments = finetuned, CASES[method]
    common = ["--queries", "queries.jsonl", "--train", "docs.jsonl", "--no-explain", *COMMON]
    import os

    here = os.getcwd()
    os.chdir(root)
    try:
        assert main(["score", *arguments, *common, "--out", f"one-{method}"]) == 0
    finally:
        os.chdir(here)
    _torchrun("score", *arguments, *common, "--out", f"two-{method}", cwd=root)
    (one, one_meta), (two, two_meta) = load_scores(root / f"one-{method}"), load_scores(root / f"two-{method}")
    assert two_meta["document_ids"] == one_meta["document_ids"] and two_meta["query_ids"] == one_meta["query_ids"]
    assert one["scores"].abs().max() > 0
    # float32 scores, sums over documents' batches added in another order on each rank
    assert _max_relative_difference(one["scores"], two["scores"]) < 1e-5, method
