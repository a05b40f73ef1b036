"""Model folders written atomically: model, tokenizer and a JSON record appear together or not at all."""

from __future__ import annotations

from pathlib import Path

from pretrace.errors import PretraceError
from pretrace.storage import atomic_directory, check_output, refuse_foreign, write_json


def refuse_existing(out: str | Path, overwrite: bool, command: str) -> None:
    """Fail before any training if `out` would be refused at the end anyway."""
    check_output(out)
    out = Path(out)
    if out.is_dir() and any(out.iterdir()):
        refuse_foreign(out, command, "--out")
        if not overwrite:
            raise PretraceError(f"{out}: already exists and is not empty; pass --overwrite or choose another --out.")


def save_model_folder(out: str | Path, model, tokenizer, record_name: str, record: dict, command: str, overwrite: bool = False) -> Path:
    """Save into a temporary sibling folder, marked as written by `command`, then rename it to `out`."""
    with atomic_directory(out, command, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / record_name, record)
    return Path(out)
