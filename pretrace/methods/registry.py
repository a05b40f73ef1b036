"""Method names → attributors: the influence methods of `pretrace.methods` and the baselines. Each builder takes
the score settings (see `pretrace.workflows.score`)."""

from __future__ import annotations

from typing import Callable

from pretrace.baselines import inverse, similarity, text, trak
from pretrace.errors import PretraceError
from pretrace.methods.base import Attributor
from pretrace.methods.gradient import PreconditionedGradients, multi_stage, single_stage


def _curvature(kind: str) -> Callable:
    def build(settings) -> Attributor:
        if settings.is_multi_stage and kind != "identity":
            return multi_stage(kind, settings.pretrained_factors, settings.finetuned_factors, settings.alpha,
                               settings.damping, settings.damping_factor, settings.finetuned_damping)
        return single_stage(kind, settings.factors, settings.damping, settings.damping_factor)

    return build


METHODS: dict[str, tuple[str, Callable]] = {
    "ekfac": ("EK-FAC inverse (eigenvalue-corrected Kronecker factors)", _curvature("ekfac")),
    "kfac": ("K-FAC inverse (Kronecker eigenvalues, no correction)", _curvature("kfac")),
    "diagonal": ("diagonal Fisher inverse (factors fitted with --diagonal)", _curvature("diagonal")),
    "identity": ("no preconditioning: gradient dot product", _curvature("identity")),
    "gradient-dot": ("gradient dot product (identity preconditioning); multi-stage: query on the fine-tuned, documents on the pre-trained model", similarity.build_gradient_dot),
    "gradient-cosine": ("cosine of query and document gradients (TracIn with one checkpoint)", similarity.build_gradient_cosine),
    "cka": ("the paper's gradient CKA: linear CKA of two gradient vectors = their squared cosine", similarity.build_cka),
    "representation": ("cosine of mean-pooled hidden states (--representation-layer)", similarity.build_representation),
    "trak": ("TRAK: projected gradients, kernel (Phi^T Phi + damping)^-1, averaged over --trak-models", trak.build_trak),
    "bm25": ("BM25 between query text (prompt + completion) and document text (--bm25-method)", text.build_bm25),
    "embedding": ("cosine of sentence embeddings of query and document text (--embedding-model)", text.build_embedding),
    "exact": ("exact (C + damping I)^-1 from the dense Gauss-Newton or Hessian (--curvature) over --fit-data; small models only", inverse.build_exact),
    "cg": ("conjugate gradient solve of (C + damping I) x = query gradient per query, exact curvature products (--iterations, --tolerance)", inverse.build_cg),
    "lissa": ("LiSSA stochastic Neumann series for (C + damping I)^-1 (--lissa-depth, --lissa-repeats, --lissa-scale)", inverse.build_lissa),
    "arnoldi": ("Arnoldi influence: top --arnoldi-rank eigenpairs of the curvature, V diag(1/(eigenvalue + damping)) V^T", inverse.build_arnoldi),
}


def make_attributor(settings) -> Attributor:
    if settings.method not in METHODS:
        raise PretraceError(f"unknown --method {settings.method!r}; choose one of {sorted(METHODS)}.")
    attributor = METHODS[settings.method][1](settings)
    if isinstance(attributor, PreconditionedGradients):
        attributor.query_rank = getattr(settings, "query_rank", None)
    return attributor
