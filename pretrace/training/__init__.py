"""Training causal LMs: the shared loop, pre-training toy models, and proximal fine-tuning."""

from pretrace.training.finetune import FINETUNE_RECORD, FinetuneSettings, ProximityPenalty, finetune, finetune_model, read_finetune_record
from pretrace.training.loop import TrainHistory, TrainSettings, batch_loss, evaluate, lr_factor, sequence_losses, train
from pretrace.training.pretrain import PRETRAIN_RECORD, build_model, load_config, pretrain

__all__ = [
    "FINETUNE_RECORD",
    "PRETRAIN_RECORD",
    "FinetuneSettings",
    "ProximityPenalty",
    "TrainHistory",
    "TrainSettings",
    "batch_loss",
    "build_model",
    "evaluate",
    "finetune",
    "finetune_model",
    "load_config",
    "lr_factor",
    "pretrain",
    "read_finetune_record",
    "sequence_losses",
    "train",
]
