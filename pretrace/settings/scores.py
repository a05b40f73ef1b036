"""Scoring names and `pretrace index`'s settings (`IndexSettings`), torch-free so `pretrace index --help` and
`pretrace score --help` load no torch; `pretrace.scores` re-exports them."""

from __future__ import annotations

from dataclasses import dataclass

from pretrace.config import MAX_SEED, changed, option, validate
from pretrace.errors import PretraceError

SPLITS = ("documents", "queries")  # what torchrun's ranks split when scoring (`pretrace.scores.plan`)
STORAGES = ("exact", "factored", "sketch")
SEARCHES = ("auto", "flat", "pq")
SKETCH_ONLY = ("--sketch-dim", "--sketch-seed", "--normalize", "--search")


@dataclass
class IndexSettings:
    storage: str = option("exact", choices=STORAGES, help="How each document's gradients are kept: 'exact' (the [d_out, d_in'] gradient per module), 'factored' (its per-token factors: exact, smaller for short documents) or 'sketch' (the compressed corpus store for large corpora: per module a k x k Kronecker sketch of the gradient, never formed whole, in float16 with nearest-neighbour search; approximate scores, for retrieval).")
    sketch_dim: int = option(8, at_least=1, at_most=1 << 12, help="--storage sketch: k, the dimension each side of a module's gradient (its output gradients and its inputs) is projected to; k² numbers per module and document.")
    sketch_seed: int = option(0, at_least=0, at_most=MAX_SEED, help="--storage sketch: seed of the projection matrices.")
    normalize: bool = option(False, help="--storage sketch: store unit-norm document sketches (TrackStar), so search ranks by cosine instead of the inner product.")
    search: str = option("auto", choices=SEARCHES, help="--storage sketch: 'flat' (exact inner products, streaming the store from disk), 'pq' (faiss product-quantised codes of every document, one byte per four dimensions, held in RAM; each query's 50,000 best re-scored exactly; needs pretrace[index]) or 'auto' (pq from 100,000 documents).")
    batches_per_shard: int | None = option(None, at_least=1, help="Document batches per shard file (default: 16, and 4096 for --storage sketch); an interrupted build resumes after its last complete shard.")

    def __post_init__(self):
        validate(self)
        unread = [flag for flag in changed(self) if flag in SKETCH_ONLY]
        if unread and self.storage != "sketch":
            raise PretraceError(f"{', '.join(unread)} only shape --storage sketch, not --storage {self.storage}; drop them.")

    @property
    def shard_batches(self) -> int:
        return self.batches_per_shard or (4096 if self.storage == "sketch" else 16)
