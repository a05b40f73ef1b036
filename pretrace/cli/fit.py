"""`pretrace fit`: EK-FAC factors of a model on a corpus."""

from __future__ import annotations

from pretrace.cli import COMMANDS

from dataclasses import dataclass

from pretrace.cli.checks import check_models, check_records
from pretrace.cli.options import add_arguments, from_arguments
from pretrace.config import option
from pretrace.settings.curvature import FitSettings
from pretrace.settings.model import ModelOptions


@dataclass
class FitPaths:
    model: str = option(help="Hugging Face model folder (config.json, weights, tokenizer).")
    data: str = option(help="JSONL documents to fit the curvature on: {'text', optional 'id'}; queries' {'prompt','completion'} for a fine-tuning stage.")
    out: str = option(help="Output factor folder (factors.safetensors + factors.json).")
    overwrite: bool = option(False, help="Replace an existing --out folder.")


def register(subparsers) -> None:
    parser = subparsers.add_parser("fit", help=COMMANDS["fit"], description=__doc__)
    for cls, title in ((FitPaths, "inputs and output"), (ModelOptions, "model loading and batching"), (FitSettings, "curvature")):
        add_arguments(parser, cls, title=title)
    parser.set_defaults(handler=run, check=check)


def check(args, produced) -> None:
    """The settings and every input, before any work (see `pretrace.cli.checks`)."""
    paths, options = from_arguments(FitPaths, args), from_arguments(ModelOptions, args)
    from_arguments(FitSettings, args)
    check_models(produced, paths.model)
    check_records(produced, options.fields(), fitting_data=paths.data)


def run(args) -> int:
    from pretrace.workflows.fit import fit

    paths = from_arguments(FitPaths, args)
    factors = fit(paths.model, paths.data, paths.out, from_arguments(ModelOptions, args), from_arguments(FitSettings, args), overwrite=paths.overwrite)
    meta = factors.metadata
    print(f"factors for {len(factors.modules)} modules from {meta['documents']} documents ({meta['tokens']} tokens) -> {paths.out}")
    return 0
