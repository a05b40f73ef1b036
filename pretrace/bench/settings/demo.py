"""`pretrace demo`'s settings."""

from __future__ import annotations

from dataclasses import dataclass

from pretrace.config import MAX_SEED, option, validate
from pretrace.errors import PretraceError


@dataclass
class DemoSettings:
    out: str = option("runs/demo", help="Working folder; every stage is cached there.")
    ptb_sentences: int = option(8000, at_least=1, help="Penn Treebank training sentences in the pre-training corpus.")
    facts: int = option(60, at_least=2, help="Capital facts stated in the pre-training corpus (some fine-tuned on, some asked).")
    query_facts: int = option(20, at_least=1, help="Facts held out of fine-tuning and asked as queries.")
    fact_repeats: int = option(4, at_least=1, help="Copies of each fact sentence in the pre-training corpus.")
    candidates: int = option(500, at_least=0, help="Random pre-training sentences scored besides the fact sentences.")
    epochs: int = option(3, at_least=1, help="Pre-training epochs.")
    fit_documents: int = option(2000, at_least=1, help="Pre-training documents (a random sample) the pre-trained curvature is fitted on.")
    alpha: float = option(0.01, above=0, help="Proximity strength α of fine-tuning.")
    seed: int = option(0, at_least=0, at_most=MAX_SEED, help="Seed for sampling, training and fitting.")

    def __post_init__(self):
        """Checked before pre-training starts: a bad value would otherwise fail (or slice the corpus) minutes later."""
        validate(self)
        if self.query_facts >= self.facts:
            raise PretraceError(f"--query-facts must be below --facts={self.facts} (the rest are fine-tuned on), got {self.query_facts}.")
        if self.candidates > self.ptb_sentences:
            raise PretraceError(f"--candidates must be at most --ptb-sentences={self.ptb_sentences}, got {self.candidates}.")
