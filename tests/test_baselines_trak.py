"""TRAK: the projection, the kernel formula against a dense autograd reference, the `traker` package side
by side, and the score workflow with an ensemble of model folders."""

import pytest
import torch

from dense import autograd_document_gradients
from pretrace.baselines.trak import TRAK, GradientProjector, damped_inverse
from pretrace.data import Document
from pretrace.data.batching import encode_documents, encode_queries, iter_batches
from pretrace.errors import PretraceError
from pretrace.methods.base import ScoringContext
from pretrace.modeling.stage import ModelOptions, load_stage
from test_baselines_similarity import QUERIES, autograd_query_gradients, random_documents, run_workflow
from tiny import save_tiny_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("trak-models")
    return [str(save_tiny_model(root / f"m{seed}", seed=seed)) for seed in (0, 1)]


@pytest.fixture(scope="module")
def docs(sentences):
    return [Document(str(i), s) for i, s in enumerate(sentences)] + random_documents(8, seed=4)


def load(path, dtype="float64"):
    return load_stage(path, ModelOptions(device="cpu", dtype=dtype, batch_size=5, padding_side="left", max_length=64))


def full_matrix(projector, tracked):
    """[P, k]: the module matrices stacked in the tracked order of flattened gradients."""
    return torch.cat([projector.matrix(t.name, range(t.d_out), t.d_in_total, torch.device("cpu"), torch.float64) for t in tracked])


def test_projection_is_a_seeded_matrix_independent_of_chunking():
    grads = torch.randn(3, 7, 5, dtype=torch.float64)
    small = GradientProjector(16, "rademacher", seed=3, chunk_elements=1, cache_bytes=0)  # one row per chunk, nothing cached
    large = GradientProjector(16, "rademacher", seed=3)
    matrix = large.matrix("layer", range(7), 5, torch.device("cpu"), torch.float64)
    torch.testing.assert_close(small.project_module("layer", grads), grads.flatten(1) @ matrix, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(large.project_module("layer", grads), grads.flatten(1) @ matrix, rtol=1e-12, atol=1e-12)
    assert set(matrix.unique().tolist()) == {-0.25, 0.25}  # ±1/√k
    other_member = GradientProjector(16, "rademacher", seed=3, member=1).matrix("layer", range(7), 5, torch.device("cpu"), torch.float64)
    other_module = large.matrix("other", range(7), 5, torch.device("cpu"), torch.float64)
    assert not torch.equal(matrix, other_member) and not torch.equal(matrix, other_module)
    gaussian = GradientProjector(256, "gaussian").matrix("w", range(64), 64, torch.device("cpu"), torch.float32)
    assert abs(float(gaussian.mean())) < 0.01 and abs(float(gaussian.var() * 256) - 1) < 0.02  # N(0, 1/k)
    with pytest.raises(PretraceError, match="projection"):
        GradientProjector(8, "sparse")


@pytest.mark.parametrize("damping,damping_factor", [(1e-3, 0.1), (None, 0.05)])
def test_trak_equals_dense_kernel_formula_averaged_over_the_ensemble(models, docs, tokenizer, damping, damping_factor):
    base = load(models[0])
    context = ScoringContext(base, base, docs, QUERIES)
    trak = TRAK(models, projection_dim=12, projection="gaussian", seed=5, damping=damping, damping_factor=damping_factor)
    trak.fit(context)
    result = trak.score(context)
    expected = []
    for member, path in zip(trak.fitted, models):
        stage = load(path)
        projection = full_matrix(member.projector, stage.tracked)
        phi = autograd_document_gradients(stage.model, stage.tracked, tokenizer, docs) @ projection
        queries = autograd_query_gradients(stage.model, stage.tracked, tokenizer, QUERIES) @ projection
        gram = phi.T @ phi
        lam = damping if damping is not None else damping_factor * torch.trace(gram) / 12
        assert member.damping == pytest.approx(float(lam), rel=1e-9)
        expected.append(queries @ torch.linalg.solve(gram + lam * torch.eye(12, dtype=gram.dtype), phi.T))
    torch.testing.assert_close(result.scores, torch.stack(expected).mean(0), rtol=1e-7, atol=1e-9)
    assert result.document_ids == [d.id for d in docs] and trak.hyperparameters()["damping"] == [m.damping for m in trak.fitted]


def test_singular_kernel_and_ensembles_in_multi_stage_are_refused(models, docs):
    with pytest.raises(PretraceError, match="singular"):
        damped_inverse(torch.randn(3, 8, dtype=torch.float64), 0.0, 0.1)
    pretrained, finetuned = load(models[0]), load(models[1])
    with pytest.raises(PretraceError, match="single-stage"):
        TRAK(models).fit(ScoringContext(finetuned, pretrained, docs, QUERIES))


def test_trak_agrees_with_the_traker_package(models, docs, tokenizer, tmp_path):
    """traker (its own per-sample gradients via torch.func, its kernel and its ensemble average) given our
    projection matrices. It divides features by c = √(number of parameters), rescales each inverse kernel by
    its mean |entry| and leaves Q = 1 here, so traker = mean_m τ_m / (c² · mean|K_m|) with λ_traker = λ / c²."""
    trak_package = pytest.importorskip("trak")
    from trak.modelout_functions import AbstractModelOutput
    from trak.projectors import AbstractProjector

    damping, k = 1e-2, 6
    base = load(models[0], dtype="float32")
    context = ScoringContext(base, base, docs, QUERIES)
    ours = TRAK(models, projection_dim=k, projection="rademacher", seed=1, damping=damping)
    ours.fit(context)
    _, member_scores = ours.member_scores(context)
    names = [f"{t.name}.{p}" for t in base.tracked for p in ("weight", "bias")]
    c2 = sum(dict(base.model.named_parameters())[n].numel() for n in names)

    def parameter_rows(member):
        """Our module matrix [d_out·(d_in+1), k] split into traker's weight [d_out·d_in] and bias [d_out] rows."""
        rows = {}
        for t in base.tracked:
            matrix = member.projector.matrix(t.name, range(t.d_out), t.d_in_total, torch.device("cpu"), torch.float64).reshape(t.d_out, t.d_in_total, k)
            rows[f"{t.name}.weight"], rows[f"{t.name}.bias"] = matrix[:, : t.d_in].reshape(-1, k), matrix[:, t.d_in]
        return rows

    class OurProjection(AbstractProjector):
        def __init__(self):
            super().__init__(c2, k, 0, "rademacher", "cpu")
            self.rows = [parameter_rows(member) for member in ours.fitted]

        def project(self, grads, model_id):
            return sum(g.flatten(1).double() @ self.rows[model_id][name] for name, g in grads.items()).float()

    class SummedLoss(AbstractModelOutput):
        """Summed cross-entropy of the target tokens; right padding needs no attention mask under vmap."""

        def __init__(self):
            pass

        @staticmethod
        def get_output(model, weights, buffers, input_ids, labels, mask):
            logits = torch.func.functional_call(model, (weights, buffers), args=(), kwargs={"input_ids": input_ids[None]}).logits[0]
            return -(torch.log_softmax(logits, -1).gather(-1, labels[:, None])[:, 0] * mask).sum()

        @staticmethod
        def get_out_to_loss_grad(model, weights, buffers, batch):
            return torch.ones(batch[0].shape[0], 1)

    def batches(encoded, size):
        for batch in iter_batches(encoded, size, tokenizer.pad_token_id, "right"):
            yield [batch.input_ids, batch.next_tokens, batch.predict_mask.float()], len(batch)

    traker = trak_package.TRAKer(model=base.model, task=SummedLoss(), train_set_size=len(docs), save_dir=str(tmp_path / "traker"),
                                 device="cpu", projector=OurProjection(), use_half_precision=False, grad_wrt=names,
                                 lambda_reg=damping / c2)
    members = [load(path, dtype="float32") for path in models]
    for model_id, member in enumerate(members):
        traker.load_checkpoint(member.model.state_dict(), model_id=model_id)
        for batch, size in batches(encode_documents(tokenizer, docs, 64), 4):
            traker.featurize(batch=batch, num_samples=size)
    traker.finalize_features()
    for model_id, member in enumerate(members):
        traker.start_scoring_checkpoint(exp_name="queries", checkpoint=member.model.state_dict(), model_id=model_id, num_targets=len(QUERIES))
        for batch, size in batches(encode_queries(tokenizer, QUERIES, 64), 2):
            traker.score(batch=batch, num_samples=size)
    theirs = torch.as_tensor(traker.finalize_scores(exp_name="queries")).T.double()
    expected = torch.stack([s / (c2 * member.kernel.abs().mean()) for s, member in zip(member_scores, ours.fitted)]).mean(0)
    torch.testing.assert_close(theirs, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))  # traker works in float32


@pytest.mark.parametrize("ensemble", [False, True])
def test_trak_through_the_score_workflow(tmp_path, models, ensemble):
    settings = {"trak_models": ",".join(models)} if ensemble else {}
    _, metadata = run_workflow(tmp_path, "trak", projection_dim=8, **settings)
    hyper = metadata["hyperparameters"]
    assert hyper["projection_dim"] == 8 and hyper["projection"] == "rademacher" and len(hyper["damping"]) == (2 if ensemble else 1)
    assert hyper["models"] == (models if ensemble else ["(the scored model)"])
    assert metadata["timings"]["one_off_seconds"] > 0
