"""The settings of `pretrace demo` and of the `pretrace bench` benchmarks (with the presets they choose from),
torch-free so their `--help` loads no torch; each benchmark's module imports its own from here."""

from pretrace.bench.settings.demo import DemoSettings
from pretrace.bench.settings.fact_tracing import FactTracingSettings
from pretrace.bench.settings.multistage_lds import MultiStageLDSSettings
from pretrace.bench.settings.quality_vs_cost import PRESETS, Preset, QualityVsCostSettings

__all__ = ["PRESETS", "DemoSettings", "FactTracingSettings", "MultiStageLDSSettings", "Preset", "QualityVsCostSettings"]
