"""Model folders written atomically: model, tokenizer and a JSON record appear together or not at all."""

from __future__ import annotations

from pathlib import Path

from pretrace.errors import PretraceError
from pretrace.storage import atomic_directory, write_json


def refuse_existing(out: str | Path, overwrite: bool) -> None:
    """Fail before any training if `out` would be refused at the end anyway."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PretraceError(f"{out}: exists and is not a folder; choose another --out.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PretraceError(f"{out}: already exists and is not empty; pass --overwrite or choose another --out.")


def save_model_folder(out: str | Path, model, tokenizer, record_name: str, record: dict, overwrite: bool = False) -> Path:
    """Save into a temporary sibling folder, then rename it to `out`."""
    with atomic_directory(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / record_name, record)
    return Path(out)
