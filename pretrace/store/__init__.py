"""The compressed corpus store: every document's gradient sketched once, searched by nearest neighbours, for
corpora too large to stream through the model at every query (`pretrace index --storage sketch`)."""

from pretrace.store.build import build_store
from pretrace.store.search import CorpusStore

__all__ = ["CorpusStore", "build_store"]
