"""Training settings: the optimisation shared by every training loop (`TrainSettings`) and `pretrace finetune`'s.

Torch-free, so `pretrace finetune --help` builds its flags without loading torch; `pretrace.training` re-exports them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pretrace.config import MAX_SEED, option, validate
from pretrace.settings.model import DEFAULT_MAX_LENGTH, DTYPE_NAMES
from pretrace.settings.records import FieldOptions

if TYPE_CHECKING:
    import torch


@dataclass
class TrainSettings:
    """Optimisation settings; `pretrace finetune` extends them with its paths and α."""

    lr: float = option(1e-3, above=0, at_most=1e3, help="Peak learning rate of AdamW.")
    epochs: int = option(1, at_least=1, help="Passes over the training data.")
    batch_size: int = option(16, at_least=1, help="Sequences per optimizer step.")
    max_length: int | None = option(512, at_least=2, help="Longer sequences are truncated (with a warning that counts them).")
    warmup: float = option(0.05, at_least=0, below=1, help="Fraction of the optimizer steps over which the learning rate rises linearly to --lr; it then decays to 0 along a cosine, stepped every optimizer step.")
    weight_decay: float = option(0.0, at_least=0, at_most=1e3, help="AdamW's decoupled weight decay, applied to every trainable parameter.")
    grad_clip: float = option(1.0, at_least=0, help="Clip the gradient's global norm to this value (0: no clipping).")
    seed: int = option(0, at_least=0, at_most=MAX_SEED, help="Seed for shuffling, dropout and initialisation; the same seed gives the same model.")
    device: str = option("auto", help="'cpu', 'cuda', 'cuda:1', ... or 'auto' (CUDA when available).")

    def __post_init__(self):
        from pretrace.parallel import group  # torch: only once settings are made, never for --help

        validate(self)
        group.check_device(self.device)

    def torch_device(self) -> torch.device:
        from pretrace.parallel import group

        return group.resolve_device(self.device)


@dataclass
class _FinetuneInputs:
    """The required settings; a base class so that they come first in `--help`."""

    model: str = option(help="Pre-trained Hugging Face model folder (config.json, weights, tokenizer).")
    data: str = option(help="JSONL fine-tuning examples: {'prompt', 'completion'} (loss on the completion only) or {'text'}.")
    alpha: float = option(at_least=0, help="Proximity strength α of the term α/2‖θ − θ_pt‖², on the scale of the mean over examples of each example's summed completion loss; `pretrace score` reads it back (0: no proximity term).")
    out: str | None = option(None, required_flag=True, help="Output folder for the fine-tuned model, its tokenizer and pretrace_finetune.json (in Python: None keeps the model in memory only).")


@dataclass
class FinetuneSettings(FieldOptions, TrainSettings, _FinetuneInputs):
    lr: float = option(1e-4, above=0, at_most=1e3, help="Peak learning rate of AdamW.")
    epochs: int = option(3, at_least=1, help="Passes over the fine-tuning data.")
    batch_size: int = option(8, at_least=1, help="Examples per optimizer step.")
    weight_decay: float = option(0.0, at_least=0, at_most=1e3, help="AdamW's decoupled weight decay (keep 0: it changes the stationary point the influence formula assumes).")
    dtype: str = option("float32", choices=DTYPE_NAMES, help="Precision of the weights during fine-tuning and on disk.")
    dropout: bool = option(False, help="Keep the model's dropout on while fine-tuning (off by default: influence assumes the deterministic objective).")
    overwrite: bool = option(False, help="Replace an earlier `pretrace finetune` result in --out.")
    max_length: int | None = option(None, at_least=2, help=f"Longer sequences are truncated (with a warning that counts them); at most the model's positions. Default: the model's positions, at most {DEFAULT_MAX_LENGTH}.")
