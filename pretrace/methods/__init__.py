"""Attribution methods behind one interface: `fit` pays the one-off cost, `score` the per-query cost."""

from pretrace.methods.base import Attributor, ScoringContext
from pretrace.methods.registry import METHODS, make_attributor

__all__ = ["Attributor", "METHODS", "ScoringContext", "make_attributor"]
