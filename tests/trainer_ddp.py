"""Run by `tests/test_training_proximal.py` under torchrun: a Trainer with PretraceCallback on 2 CPU processes
(gloo), each with half of every batch, and the fine-tuned factors. Arguments: ROOT (holding pretrained/ and qa.jsonl),
OUT; the first process writes the Trainer's log history to OUT-log.json."""

import json
import sys
from pathlib import Path

import torch

from pretrace.modeling.loading import load_model
from test_training_proximal import ALPHA, OPTIONS, _trainer
from pretrace.workflows.proximal import PretraceCallback

root, out = Path(sys.argv[1]), Path(sys.argv[2])
model = load_model(root / "pretrained", "float64", torch.device("cpu"))
callback = PretraceCallback(model, ALPHA, root / "pretrained", root / "qa.jsonl", out, factors=out.parent / f"{out.name}-factors", options=OPTIONS)
trainer = _trainer(root, root / "qa.jsonl", callback, model, per_device_train_batch_size=2, ddp_backend="gloo",
                   output_dir=str(out.parent / f"{out.name}-trainer"))
trainer.train()
if trainer.args.process_index == 0:
    (out.parent / f"{out.name}-log.json").write_text(json.dumps(trainer.state.log_history))
