"""What a command checks of its inputs before any work, without loading a model: used by `pretrace run` on every
step before the first one runs. An input another step produces (a path inside an earlier step's --out) is checked
when that step has written it, not here."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from pretrace.settings.records import Fields


def produced_by_earlier(path: str | Path | None, produced: Iterable[Path]) -> bool:
    """Whether `path` is (inside) the output of an earlier step: it does not exist yet when the pipeline starts."""
    if path is None:
        return True
    resolved = Path(path).resolve()
    return any(resolved == out or out in resolved.parents for out in produced)


def check_models(produced: Iterable[Path], *folders: str | None) -> None:
    from pretrace.modeling.folders import check_model_dir

    for folder in folders:
        if not produced_by_earlier(folder, produced):
            check_model_dir(folder)


def check_factor_folders(produced: Iterable[Path], *folders: str | None) -> None:
    from pretrace.curvature.factors import factors_metadata

    for folder in folders:
        if not produced_by_earlier(folder, produced):
            factors_metadata(folder)


def check_records(produced: Iterable[Path], fields: Fields, **sources: str | None) -> None:
    """Read every record of each source (`kind=path`, kinds: documents, queries, fine_tuning_examples, fitting_data; '_' for ' ') so a bad one fails now."""
    from pretrace.data.records import check_source, read_queries, scan_records, validate_documents  # torch: not for --help

    readers = {
        "documents": lambda path: validate_documents(path, fields),
        "queries": lambda path: read_queries(path, fields=fields),
        "fine-tuning examples": lambda path: read_queries(path, "fine-tuning example", fields),
        "fitting data": lambda path: scan_records(path, fields),
    }
    for kind, path in sources.items():
        if not produced_by_earlier(path, produced):
            check_source(path, kind.replace("_", " "))
            readers[kind.replace("_", " ")](path)
