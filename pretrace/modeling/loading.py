"""Load a causal LM and its tokenizer from a local folder, and fingerprint it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
import torch

from pretrace.errors import PretraceError

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise PretraceError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}.") from None


def check_model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise PretraceError(f"{path}: no such folder; pass a Hugging Face model folder (with config.json and weights).")
    if not path.is_dir():
        raise PretraceError(f"{path}: is a file; pass the Hugging Face model folder that contains it.")
    if not (path / "config.json").is_file():
        raise PretraceError(f"{path}: not a model folder (no config.json); save one with model.save_pretrained(folder).")
    return path


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    path = check_model_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise PretraceError(f"{path}: no usable tokenizer ({exc.__class__.__name__}: {exc}); save it with tokenizer.save_pretrained(folder).") from None
    return tokenizer


def load_model(path: str | Path, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu", device_map: str | None = None):
    """Load in eval mode (dropout off): influence is defined for the deterministic model.

    With `device_map` (e.g. "auto", needs `accelerate`) the layers are spread over the available devices
    instead of moved to `device`, for models that do not fit one."""
    from transformers import AutoModelForCausalLM

    path = check_model_dir(path)
    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, **({"device_map": device_map} if device_map else {}))
    except Exception as exc:
        raise PretraceError(f"{path}: could not load the model ({exc.__class__.__name__}: {exc}).") from None
    return (model if device_map else model.to(device)).eval()


def pad_token_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the config and all weights: identifies the exact model factors and fine-tunes belong to."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        cfg = config.to_dict()
        for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash", "_attn_implementation_autoset"):
            cfg.pop(volatile, None)
        digest.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    params = dict(model.named_parameters())
    for name in sorted(params):
        tensor = params[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()
