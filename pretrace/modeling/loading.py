"""Load a causal LM and its tokenizer from a local folder, and fingerprint it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
import torch

from pretrace.errors import PretraceError
from pretrace.modeling.adapters import adapter_base, is_adapter_folder, load_adapter_model
from pretrace.modeling.folders import check_model_dir, model_config, verify_written_model
from pretrace.settings.model import DEFAULT_MAX_LENGTH, DTYPE_NAMES

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise PretraceError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}.") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model")


def load_tokenizer(path: str | Path, base: str | Path | None = None):
    """The folder's own tokenizer (an adapter folder without one: its base model's; `base` as in `load_model`);
    refused when there is none (transformers would build a near-empty one)."""
    from transformers import AutoTokenizer

    path = check_model_dir(path)
    if is_adapter_folder(path) and not any((path / name).is_file() for name in TOKENIZER_FILES):
        return load_tokenizer(adapter_base(path, base))
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise PretraceError(f"{path}: has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save it beside the model with tokenizer.save_pretrained(folder).")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise PretraceError(f"{path}: no usable tokenizer ({exc.__class__.__name__}: {exc}); save it with tokenizer.save_pretrained(folder).") from None
    return tokenizer


def _check_causal_architecture(path: Path) -> None:
    """A folder saved from a non-causal head (e.g. BertForMaskedLM) would load as a causal LM with a new head or
    bidirectional attention; influence of such a model on next-token losses means nothing."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architectures = model_config(path).get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(name, str) for name in architectures):
        raise PretraceError(f"{path}/config.json: 'architectures' must be a list of class names; save the model again with model.save_pretrained(folder).")
    causal = {name for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for name in ((value,) if isinstance(value, str) else value)}
    model_type = model_config(path).get("model_type")
    if model_type is not None and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not any(name in causal for name in architectures):
        import transformers

        raise PretraceError(f"{path}: model_type {model_type!r} is unknown to transformers {transformers.__version__} (or has no causal LM); "
                            "upgrade transformers, or save the model with an architecture it knows.")
    if architectures and not any(name in causal for name in architectures):
        raise PretraceError(f"{path}: is a {', '.join(architectures)}, not a causal language model; pass a model with a causal LM head (e.g. *ForCausalLM).")


def load_model(path: str | Path, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu", device_map: str | None = None,
               *, base: str | Path | None = None, adapter: str = "merged"):
    """Load in eval mode (dropout off): influence is defined for the deterministic model.

    With `device_map` (e.g. "auto", needs `accelerate`) the layers are spread over the available devices
    instead of moved to `device`, for models that do not fit one. A PEFT adapter folder is applied to its base
    model (the one it records when that is a local folder, else `base`): merged into plain weights, or with
    `adapter="adapter"` kept unmerged (see `pretrace.modeling.adapters`)."""
    from transformers import AutoModelForCausalLM

    path = check_model_dir(path)
    verify_written_model(path)
    if is_adapter_folder(path):
        return load_adapter_model(path, load_model(adapter_base(path, base), dtype, device, device_map), adapter)
    _check_causal_architecture(path)
    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, output_loading_info=True,
                                                           **({"device_map": device_map} if device_map else {}))
    except Exception as exc:
        raise PretraceError(f"{path}: could not load the model ({exc.__class__.__name__}: {exc}).") from None
    absent = sorted(info.get("missing_keys") or []) + sorted(str(key[0] if isinstance(key, tuple) else key) for key in info.get("mismatched_keys") or [])
    if absent:
        raise PretraceError(f"{path}: the weights lack or mis-shape {len(absent)} parameter(s) ({', '.join(absent[:3])}{', ...' if len(absent) > 3 else ''}), "
                            "which would be initialised at random; save the complete model with model.save_pretrained(folder).")
    return (model if device_map else model.to(device)).eval()


def position_limit(model: torch.nn.Module) -> int | None:
    """The longest sequence the model's config declares it handles (None: no declared limit, e.g. ALiBi)."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_model_tokenizer(path: str | Path, model: torch.nn.Module, tokenizer, max_length: int | None) -> int:
    """Refuse a tokenizer that emits ids the model has no embedding for, or a --max-length beyond the model's
    positions (absolute position tables fail with an IndexError, rotary ones silently extrapolate); return the
    sequence length to use: `max_length`, or by default the smaller of the model's limit and 512."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise PretraceError(f"{path}: the tokenizer has {len(tokenizer)} tokens but the model embeds only {rows}; "
                            "use the tokenizer the model was trained with, or model.resize_token_embeddings(len(tokenizer)) and save it.")
    limit = position_limit(model)
    if max_length is None:
        return min(DEFAULT_MAX_LENGTH, limit) if limit else DEFAULT_MAX_LENGTH
    if limit is not None and max_length > limit:
        raise PretraceError(f"--max-length {max_length} exceeds the {limit} positions of {path}; pass --max-length {limit} or less.")
    return max_length


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
