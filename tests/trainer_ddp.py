"""Run by `tests/test_training_proximal.py` under torchrun: a Trainer with PretraceCallback on 2 CPU processes
(gloo), each with half of every batch. Arguments: ROOT (holding pretrained/ and qa.jsonl), OUT."""

import sys
from pathlib import Path

import torch

from pretrace.modeling.loading import load_model
from test_training_proximal import ALPHA, _trainer
from pretrace.workflows.proximal import PretraceCallback

root, out = Path(sys.argv[1]), Path(sys.argv[2])
model = load_model(root / "pretrained", "float64", torch.device("cpu"))
callback = PretraceCallback(model, ALPHA, root / "pretrained", root / "qa.jsonl", out)
trainer = _trainer(root, root / "qa.jsonl", callback, model, per_device_train_batch_size=2, ddp_backend="gloo",
                   output_dir=str(out.parent / f"{out.name}-trainer"))
trainer.train()
