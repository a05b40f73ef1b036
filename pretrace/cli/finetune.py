"""`pretrace finetune`: full-parameter fine-tuning with the proximity term α/2‖θ − θ_pt‖² that multi-stage influence assumes.

Runs unchanged under `torchrun --nproc-per-node N -m pretrace finetune ...`: --batch-size stays the global
batch, each process takes its share of every batch and the gradients are summed over processes."""

from __future__ import annotations

from pretrace.cli import COMMANDS

from pretrace.cli.checks import check_models, check_records
from pretrace.cli.options import add_arguments, from_arguments
from pretrace.settings.training import FinetuneSettings


def register(subparsers) -> None:
    parser = subparsers.add_parser("finetune", help=COMMANDS["finetune"], description=__doc__)
    add_arguments(parser, FinetuneSettings)
    parser.set_defaults(handler=run, check=check)


def check(args, produced) -> None:
    """The settings and every input, before any work (see `pretrace.cli.checks`)."""
    settings = from_arguments(FinetuneSettings, args)
    check_models(produced, settings.model)
    check_records(produced, settings.fields(), fine_tuning_examples=settings.data)


def run(args) -> int:
    from pretrace.training.finetune import finetune, read_finetune_record

    settings = from_arguments(FinetuneSettings, args)
    finetune(settings)
    record = read_finetune_record(settings.out)
    print(f"fine-tuned on {record['examples']} examples for {record['steps']} steps (alpha={record['alpha']}, "
          f"final loss {record['final_train_loss']:.4f}) -> {settings.out}")
    return 0
