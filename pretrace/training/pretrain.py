"""Pre-train a causal LM from a config on documents: the toy models of the demo and the benchmarks.

The loss is the mean per target token over each batch. The tokenizer defines the vocabulary: a
config's `vocab_size` and special-token ids are replaced by the tokenizer's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import torch

from pretrace.config import to_dict
from pretrace.data.batching import encode_documents, pad_token_id
from pretrace.data.records import Document
from pretrace.errors import PretraceError
from pretrace.modeling.loading import parse_dtype
from pretrace.training.loop import TrainSettings, train
from pretrace.training.output import refuse_existing, save_model_folder

PRETRAIN_RECORD = "pretrace_pretrain.json"
VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures")


def load_config(path: str | Path):
    """A transformers config from a `config.json` file (e.g. the seed's toy GPT-NeoX)."""
    from transformers import AutoConfig

    path = Path(path)
    if not path.is_file():
        raise PretraceError(f"{path}: no such config file; pass a transformers config.json.")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        values = {k: v for k, v in values.items() if k not in VOLATILE_CONFIG_KEYS}
        return AutoConfig.for_model(values.pop("model_type"), **values)
    except (json.JSONDecodeError, KeyError, ValueError) as exc:
        raise PretraceError(f"{path}: not a transformers config with a known 'model_type' ({exc}).") from None


def build_model(config, tokenizer, seed: int = 0, dtype: str = "float32") -> torch.nn.Module:
    """A randomly initialised causal LM (seeded) whose vocabulary and special ids are the tokenizer's."""
    from transformers import AutoModelForCausalLM

    special = pad_token_id(tokenizer)
    config.vocab_size = len(tokenizer)
    config.bos_token_id = config.eos_token_id = config.pad_token_id = special
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=parse_dtype(dtype))


def pretrain(
    config_or_model,
    tokenizer,
    documents: Sequence[Document],
    settings: TrainSettings,
    *,
    validation: Sequence[Document] | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    dtype: str = "float32",
    progress: bool = True,
) -> torch.nn.Module:
    """Train a model (a config or config.json path builds a fresh one) and return it in eval mode.

    With `out`, the model, tokenizer and `pretrace_pretrain.json` (settings, counts, losses) are saved
    there atomically. The validation loss (mean per token) is printed and recorded.
    """
    from transformers import PreTrainedModel

    if out is not None:
        refuse_existing(out, overwrite, "pretrain")
    if isinstance(config_or_model, (str, Path)):
        config_or_model = load_config(config_or_model)
    if isinstance(config_or_model, PreTrainedModel):
        model = config_or_model
    else:
        model = build_model(config_or_model, tokenizer, settings.seed, dtype)
    model.to(settings.torch_device())
    pad_id = pad_token_id(tokenizer)
    items = list(encode_documents(tokenizer, documents, settings.max_length))
    held_out = list(encode_documents(tokenizer, validation, settings.max_length)) if validation else None
    started = time.perf_counter()
    history = train(model, items, settings, pad_id, normalisation="token", validation=held_out, progress=progress)
    seconds = time.perf_counter() - started
    record = {
        "settings": to_dict(settings),
        "documents": len(items),
        "tokens": sum(sum(item.target_mask) for item in items),
        "steps": history.steps,
        "seconds": round(seconds, 2),
        "loss_normalisation": "token",
        "final_train_loss": sum(history.losses[-50:]) / len(history.losses[-50:]),  # mean of the last ≤ 50 steps
        "validation_losses": history.validation_losses,
        "validation_documents": len(held_out) if held_out else 0,
    }
    if out is not None:
        save_model_folder(out, model, tokenizer, PRETRAIN_RECORD, record, "pretrain", overwrite)
    return model
