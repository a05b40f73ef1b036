"""TRAK's ensemble trained inside `score` (--trak-ensemble): distinct members on seeded subsets, trained once and
reused from their folder, the same scores as --trak-models on those folders, and the training in the one-off cost."""


import pytest
import torch

from pretrace.config import from_flags
from pretrace.baselines import trak_ensemble
from pretrace.baselines.trak_ensemble import subset
from pretrace.errors import PretraceError
from pretrace.modeling.loading import load_model
from pretrace.scores.io import load_scores
from pretrace.modeling.stage import ModelOptions, load_stage
from pretrace.workflows.score import ScoreSettings, score
from test_baselines_similarity import QUERIES, query_record, random_documents
from tiny import save_tiny_model, write_jsonl

TRAINING = {"trak_epochs": 2, "trak_batch_size": 4, "trak_lr": 1e-2, "projection_dim": 8}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, sentences):
    root = tmp_path_factory.mktemp("trak-ensemble")
    model = save_tiny_model(root / "model")
    documents = [{"id": f"s{i}", "text": s} for i, s in enumerate(sentences)] + [{"id": d.id, "text": d.text} for d in random_documents(8, seed=5)]
    return root, str(model), write_jsonl(root / "queries.jsonl", [query_record(q) for q in QUERIES]), write_jsonl(root / "train.jsonl", documents)


def _score(workspace, name, **settings):
    root, model, queries, train = workspace
    out = root / name
    result = score(from_flags(ScoreSettings, queries=queries, train=train, out=str(out), model=model, method="trak", top_k=2, **settings),
                   ModelOptions(device="cpu", dtype="float64", batch_size=4, max_length=64))
    return result, load_scores(out)[1]


@pytest.fixture(scope="module")
def trained(workspace):
    """Two members trained by the first run, in the default folder beside --out."""
    return _score(workspace, "first", trak_ensemble=2, **TRAINING)


def test_members_are_distinct_models_on_distinct_subsets(workspace, trained):
    root, model, _, _ = workspace
    _, metadata = trained
    ensemble = metadata["hyperparameters"]["ensemble"]
    members = [m["path"] for m in ensemble["trained"]]
    assert members == [str(root / "first.trak-ensemble" / f"member-{m}") for m in range(2)] == metadata["hyperparameters"]["models"]
    assert [m["documents"] for m in ensemble["trained"]] == [8, 8] and all(m["trained_now"] for m in ensemble["trained"])
    assert subset(16, 0.5, 0, 0) != subset(16, 0.5, 0, 1) and subset(16, 0.5, 0, 1) == subset(16, 0.5, 0, 1)
    weights = [dict(load_model(path, "float64").named_parameters()) for path in [model, *members]]
    name = "gpt_neox.layers.0.mlp.dense_h_to_4h.weight"
    assert not torch.equal(weights[1][name], weights[2][name])  # different seeds and subsets
    assert not torch.equal(weights[0][name], weights[1][name])  # trained from scratch, not the scored model


def test_training_counts_in_the_one_off_cost(trained):
    _, metadata = trained
    timings, ensemble = metadata["timings"], metadata["hyperparameters"]["ensemble"]
    assert 0 < sum(m["train_seconds"] for m in ensemble["trained"]) <= timings["ensemble_training_seconds"] <= timings["one_off_seconds"]


def test_members_are_reused_and_equal_the_trak_models_path(workspace, trained, monkeypatch):
    root = workspace[0]
    first, metadata = trained
    folder = str(root / "first.trak-ensemble")
    monkeypatch.setattr(trak_ensemble, "pretrain", lambda *args, **kwargs: pytest.fail("a cached member was retrained"))
    again, again_metadata = _score(workspace, "again", trak_ensemble=2, trak_ensemble_dir=folder, **TRAINING)
    assert not any(m["trained_now"] for m in again_metadata["hyperparameters"]["ensemble"]["trained"])
    torch.testing.assert_close(again.scores, first.scores, rtol=0, atol=0)
    given, _ = _score(workspace, "given", trak_models=",".join(metadata["hyperparameters"]["models"]), projection_dim=8)
    torch.testing.assert_close(given.scores, first.scores, rtol=0, atol=0)


def test_a_folder_trained_differently_and_conflicting_settings_are_refused(workspace, trained):
    folder = str(workspace[0] / "first.trak-ensemble")
    with pytest.raises(PretraceError, match="trained differently.*lr"):
        _score(workspace, "other-lr", trak_ensemble=2, trak_ensemble_dir=folder, **{**TRAINING, "trak_lr": 1e-3})
    with pytest.raises(PretraceError, match="not both"):
        _score(workspace, "both", trak_ensemble=2, trak_models=folder)
    with pytest.raises(PretraceError, match="--trak-subset-fraction"):
        _score(workspace, "fraction", trak_ensemble=2, trak_subset_fraction=0.0)


def test_members_may_start_from_the_model_and_more_members_train_only_the_new_ones(workspace, tmp_path):
    root, model, _, train = workspace
    stage = load_stage(model, ModelOptions(device="cpu", dtype="float64", batch_size=4, max_length=64))
    settings = dict(folder=str(tmp_path / "ensemble"), data=train, epochs=1, lr=1e-4, batch_size=4, init="model")
    first = trak_ensemble.train_ensemble(trak_ensemble.EnsembleSettings(members=1, **settings), stage, progress=False)
    both = trak_ensemble.train_ensemble(trak_ensemble.EnsembleSettings(members=2, **settings), stage, progress=False)
    assert [m.trained_now for m in first] == [True] and [m.trained_now for m in both] == [False, True]
    name = "gpt_neox.layers.0.mlp.dense_h_to_4h.weight"
    base, member = stage.model.get_parameter(name), load_model(both[1].path, "float64").get_parameter(name)
    assert 0 < float((member - base).detach().abs().max()) < 0.01  # a few small steps away from the scored model
