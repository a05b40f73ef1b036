"""Every registered method through `pretrace score`: the score folder's JSON splits its time into the one-off
cost (fitting, indexing, training an ensemble) and the per-query cost, and records its hyper-parameters."""

import time

import pytest

from pretrace.curvature import FitSettings
from pretrace.methods.config import CG, METHODS, TRAK, Arnoldi, Damping, LiSSA
from pretrace.scores.io import load_scores
from pretrace.modeling.stage import ModelOptions
from pretrace.workflows.fit import fit
from pretrace.workflows.score import Outputs, ScoreSettings, score
from test_baselines_similarity import QUERIES, query_record
from tiny import save_tiny_model, write_jsonl

SETTINGS = {  # small enough for a second each on the tiny model's last MLP
    "trak": {"method": TRAK(projection_dim=8)},
    "cg": {"method": CG(iterations=50, tolerance=0.05)},
    "lissa": {"method": LiSSA(depth=3), "damping": Damping(absolute=1.0)},
    "arnoldi": {"method": Arnoldi(rank=2, iterations=4)},
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, sentences):
    root = tmp_path_factory.mktemp("timings")
    model = str(save_tiny_model(root / "model"))
    train = write_jsonl(root / "train.jsonl", [{"id": f"d{i}", "text": s} for i, s in enumerate(sentences)])
    queries = write_jsonl(root / "queries.jsonl", [query_record(q) for q in QUERIES])
    options = ModelOptions(device="cpu", dtype="float64", batch_size=4, modules=r"layers\.1\.mlp")
    fit(model, train, root / "factors", options, FitSettings(diagonal=True), progress=False)
    return root, model, train, queries, options


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_reports_its_time_split(workspace, method):
    root, model, train, queries, options = workspace
    out = root / method
    stage = {} if method in ("bm25", "embedding") else {"model": model}  # the text methods load no model
    factors = {"factors": str(root / "factors")} if METHODS[method].factors else {}
    settings = {"method": method, **SETTINGS.get(method, {})}
    started = time.perf_counter()
    score(ScoreSettings(queries=queries, train=train, out=str(out), outputs=Outputs(top_k=2), **stage, **factors, **settings),
          options if stage else ModelOptions())
    wall = time.perf_counter() - started
    _, metadata = load_scores(out)
    timings = metadata["timings"]
    assert timings["one_off_seconds"] >= 0 and timings["per_query_seconds"] > 0 and timings["explanation_seconds"] >= 0
    # the parts are disjoint spans of this call: together no longer than the call itself (double counting would exceed it)
    assert timings["one_off_seconds"] + timings["per_query_seconds"] * len(QUERIES) + timings["explanation_seconds"] <= wall
    assert metadata["method"] == method and isinstance(metadata["hyperparameters"], dict)
