"""`pretrace bench`: reproducible benchmarks, one sub-command each (`quality-vs-cost`, `fact-tracing`, `multistage-lds`)."""

from __future__ import annotations

from pathlib import Path

from pretrace.cli import COMMANDS


from pretrace.cli.options import add_arguments, from_arguments


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help=COMMANDS["bench"], description=__doc__)
    benchmarks = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    _register_quality_vs_cost(benchmarks)
    _register_fact_tracing(benchmarks)
    _register_multistage_lds(benchmarks)


def _register_quality_vs_cost(benchmarks) -> None:
    from pretrace.bench.settings import QualityVsCostSettings

    parser = benchmarks.add_parser("quality-vs-cost", help="correlation with converged CG against per-query time, every method",
                                   description="The paper's scalability study on a toy GPT-NeoX trained on Penn Treebank; every stage is cached in --out.")
    add_arguments(parser, QualityVsCostSettings)
    parser.set_defaults(handler=run_quality_vs_cost)


def _mean_std(mean: float | None, std: float | None) -> str:
    return f"{'—':>15}" if mean is None else f"{mean:>7.3f} ± {std or 0.0:<5.3f}"


def run_quality_vs_cost(args) -> int:
    from pretrace.bench.quality_vs_cost import QualityVsCostSettings, run_quality_vs_cost as run_benchmark

    settings = from_arguments(QualityVsCostSettings, args)
    rows = run_benchmark(settings)
    print(f"\n{'method':<26} {'pearson':>15} {'spearman':>15} {'LDS':>15} {'one-off s':>10} {'per-query s':>12}")
    for row in rows:
        print(f"{row['alg']:<26} {row['pc']:>7.3f} ± {row['pc-std']:<5.3f} {row['sc']:>7.3f} ± {row['sc-std']:<5.3f} "
              f"{_mean_std(row.get('lds'), row.get('lds-std'))} "
              f"{row['overhead']:>10.2f} {row['job']:>12.4f}")
    print(f"\nresults in {settings.out}/results.json and {settings.out}/results.png")
    return 0


def _register_fact_tracing(benchmarks) -> None:
    from pretrace.bench.settings import FactTracingSettings

    parser = benchmarks.add_parser("fact-tracing", help="multi-stage fact tracing on a real LLM: MRR and recall@10 of every method",
                                   description="The paper's T-REx/LAMA experiment (bundled offline instance by default); every stage is cached in --out.")
    add_arguments(parser, FactTracingSettings)
    parser.set_defaults(handler=run_fact_tracing)


def run_fact_tracing(args) -> int:
    from pretrace.bench.facts.run import run_fact_tracing as run_benchmark
    from pretrace.bench.settings import FactTracingSettings

    settings = from_arguments(FactTracingSettings, args)
    run_benchmark(settings)
    return _show_results(settings.results_folder())


def _show_results(folder: Path) -> int:
    """A benchmark's `results.md` on stdout, and where its files are."""
    print()
    print((folder / "results.md").read_text(encoding="utf-8"))
    print(f"results in {folder}/results.json and {folder}/results.md")
    return 0


def _register_multistage_lds(benchmarks) -> None:
    from pretrace.bench.settings import MultiStageLDSSettings

    parser = benchmarks.add_parser("multistage-lds", help="multi-stage LDS: retrain both stages of a toy GPT-NeoX on random halves",
                                   description="Does multi-stage influence predict retraining both stages on a non-convex network? "
                                               "Every stage is cached in --out.")
    add_arguments(parser, MultiStageLDSSettings)
    parser.set_defaults(handler=run_multistage_lds)


def run_multistage_lds(args) -> int:
    from pretrace.bench.multistage_lds import MultiStageLDSSettings, run_multistage_lds as run_benchmark

    settings = from_arguments(MultiStageLDSSettings, args)
    run_benchmark(settings)
    return _show_results(Path(settings.out))
