"""What a model folder is before anything is loaded from it: a local folder with config.json (or a PEFT adapter's
adapter_config.json), or a hub name fetched when online; its config readable; and, when pretrace wrote it, its
files as they were written."""

from __future__ import annotations

import json
from pathlib import Path

from pretrace.errors import PretraceError
from pretrace.storage import folder_owner, verify_folder

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_folder(path: str | Path) -> bool:
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def _hub_model_name(path: Path) -> bool:
    return len(path.parts) == 2 and not str(path).startswith((".", "/", "~"))


def _fetch_hub_model(name: str) -> Path:
    """A hub model's local snapshot (downloaded once into the Hugging Face cache), or a clear refusal offline."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]))
    except Exception as exc:  # offline mode, no network, unknown repository: the hub client raises many types
        raise PretraceError(f"{name}: no such folder, and the hub model {name!r} could not be fetched ({exc.__class__.__name__}); "
                            f"on a machine online run `huggingface-cli download {name} --local-dir FOLDER` (or model.save_pretrained(FOLDER)) "
                            "and pass FOLDER.") from None


def check_model_dir(path: str | Path) -> Path:
    """A local model folder (config.json and weights), a PEFT adapter folder (adapter_config.json), or a hub model
    name (`owner/name`), fetched into the Hugging Face cache when the machine is online; returns the local folder."""
    path = Path(path)
    if not path.exists():
        if _hub_model_name(path):
            path = _fetch_hub_model(str(path))
        else:
            raise PretraceError(f"{path}: no such folder; pass a Hugging Face model folder (with config.json and weights).")
    if not path.is_dir():
        raise PretraceError(f"{path}: is a file; pass the Hugging Face model folder that contains it.")
    if not (path / "config.json").is_file() and not is_adapter_folder(path):
        raise PretraceError(f"{path}: not a model folder (no config.json, nor a PEFT adapter_config.json); save one with model.save_pretrained(folder).")
    if (path / "config.json").is_file():
        model_config(path)  # a broken config.json is said as such, before the tokenizer (which reads it too) is loaded
    return path


def verify_written_model(path: Path) -> None:
    """A model folder pretrace wrote (a fine-tune, a TRAK member) is read only as it was written: its manifest's sha256s."""
    owner = folder_owner(path)
    if owner is not None and "files" in owner:
        verify_folder(path, owner["command"], f"write it again with `pretrace {owner['command']}`")


def model_config(path: Path) -> dict:
    """The folder's config.json, refused unless it is a readable JSON object."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise PretraceError(f"{path}/config.json: unreadable ({exc.__class__.__name__}: {exc}); save the model again with model.save_pretrained(folder).") from None
    if not isinstance(config, dict):
        raise PretraceError(f"{path}/config.json: holds a JSON {type(config).__name__}, not the object of a model's configuration; "
                            "save the model again with model.save_pretrained(folder).")
    return config
