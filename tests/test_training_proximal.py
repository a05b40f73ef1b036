"""Proximal fine-tuning in the user's own loop: a Trainer with PretraceCallback equals `pretrace finetune` +
`pretrace fit` on the same data and settings (weights, loss trajectory, record, factors)."""

from __future__ import annotations

import json

import pytest
import torch

from pretrace.curvature import Factors
from pretrace.errors import PretraceError
from pretrace.modeling.loading import load_model, load_tokenizer
from pretrace.training import FINETUNE_RECORD, FinetuneSettings, finetune
from pretrace.workflows.proximal import PretraceCallback, ProximalFinetuning, pad_examples, trainer_examples
from pretrace.modeling.stage import ModelOptions
from pretrace.workflows.fit import fit
from tiny import save_tiny_model, write_jsonl

EXAMPLES = [
    {"id": "0", "prompt": "paris is the capital of", "completion": " france ."},
    {"id": "1", "prompt": "berlin is the capital of", "completion": " germany ."},
    {"id": "2", "prompt": "rome is in", "completion": " italy and madrid is in spain ."},
    {"id": "3", "prompt": "the cat sat on", "completion": " the mat ."},
]
LR, EPOCHS, ALPHA, CLIP = 1e-2, 4, 0.5, 1.0
OPTIONS = ModelOptions(device="cpu", dtype="float64", batch_size=2, max_length=32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("proximal")
    save_tiny_model(root / "pretrained", "gpt_neox", dtype=torch.float64)
    data = write_jsonl(root / "qa.jsonl", EXAMPLES)
    finetune(FinetuneSettings(model=str(root / "pretrained"), data=data, out=str(root / "ours"), alpha=ALPHA, lr=LR, epochs=EPOCHS,
                              batch_size=len(EXAMPLES), warmup=0.0, grad_clip=CLIP, dtype="float64", device="cpu", max_length=32), progress=False)
    fit(root / "ours", data, root / "ours-factors", OPTIONS, progress=False)
    return root, data


def _trainer(root, data, callback, model, **overrides):
    from transformers import Trainer, TrainingArguments

    tokenizer = load_tokenizer(root / "pretrained")
    arguments = dict(output_dir=str(root / "trainer"), learning_rate=LR, num_train_epochs=EPOCHS, per_device_train_batch_size=len(EXAMPLES),
                     lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=CLIP, optim="adamw_torch",
                     logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    arguments.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**arguments), train_dataset=trainer_examples(tokenizer, data, 32),
                   data_collator=pad_examples(tokenizer.pad_token_id), processing_class=tokenizer,
                   compute_loss_func=callback.loss, callbacks=[callback])


@pytest.fixture(scope="module")
def trained(setup):
    """A Trainer run with the callback, writing `theirs/` and its factors `theirs-factors/`."""
    root, data = setup
    model = load_model(root / "pretrained", "float64", torch.device("cpu"))
    callback = PretraceCallback(model, ALPHA, root / "pretrained", data, root / "theirs", factors=root / "theirs-factors", options=OPTIONS)
    trainer = _trainer(root, data, callback, model)
    trainer.train()
    return trainer


def test_trainer_with_the_callback_equals_pretrace_finetune(setup, trained):
    root, data = setup
    _assert_same_fine_tune(root, data, "theirs", trained)


def _assert_same_fine_tune(root, data, folder, trainer):
    ours, theirs = load_model(root / "ours", "float64", torch.device("cpu")), load_model(root / folder, "float64", torch.device("cpu"))
    heads = ours.config.num_attention_heads
    for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        if name.endswith("query_key_value.bias"):  # GPT-NeoX's [head][q|k|v] layout: drop the key biases, whose data
            # gradient is exactly 0 (softmax is shift-invariant), so AdamW turns summation-order noise into full steps
            p, q = (t.reshape(heads, 3, -1)[:, [0, 2]] for t in (p, q))
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-13, msg=name)  # float64 throughout: measured ≤ 3e-16
    batch = pad_examples(0)(trainer_examples(load_tokenizer(root / "pretrained"), data, 32))
    with torch.no_grad():  # the key biases do not change what the model computes
        logits = [m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits for m in (ours, theirs)]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-10, atol=1e-12)
    moved = sum((p - q).norm() for p, q in zip(ours.parameters(), load_model(root / "pretrained", "float64", torch.device("cpu")).parameters()))
    assert moved > 1e-2  # the comparison is not between two unmoved models

    record, expected = (json.loads((root / f / FINETUNE_RECORD).read_text()) for f in (folder, "ours"))
    for key in ("alpha", "loss_normalisation", "objective", "pretrained_fingerprint", "data_sha256", "examples", "steps"):
        assert record[key] == expected[key], key
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == EPOCHS  # one logged step per epoch (the Trainer's loss includes the proximity term; the record's does not)
    assert record["final_train_loss"] == pytest.approx(expected["final_train_loss"], rel=1e-6)



def test_factors_equal_pretrace_fit(setup, trained):
    root, data = setup
    # the covariances equal those of `pretrace fit` on pretrace's own fine-tune; Λ equals `pretrace fit` on the callback's
    # model: on these few tokens A and G are rank-deficient, and Λ's null-space coordinates (where the second pass's
    # fresh label samples land) depend on the eigenbasis chosen there, so the key biases' 1e-16 rounding moves them
    fit(root / "theirs", data, root / "theirs-refit", OPTIONS, progress=False)
    mine, reference, refit = (Factors.load(root / f) for f in ("theirs-factors", "ours-factors", "theirs-refit"))
    assert mine.module_names() == reference.module_names() == refit.module_names()
    for name in reference.module_names():
        for field in ("activation_covariance", "gradient_covariance"):
            torch.testing.assert_close(getattr(mine.modules[name], field), getattr(reference.modules[name], field), rtol=1e-6, atol=1e-10)
        for field in ("activation_covariance", "gradient_covariance", "activation_eigenvectors", "gradient_eigenvectors", "lambda_"):
            assert torch.equal(getattr(mine.modules[name], field), getattr(refit.modules[name], field)), (name, field)


def test_gradient_accumulation_gives_the_same_fine_tune(setup):
    """Two micro-batches of 2 accumulated: the loss and the proximity gradient are each divided by the steps."""
    root, data = setup
    model = load_model(root / "pretrained", "float64", torch.device("cpu"))
    callback = PretraceCallback(model, ALPHA, root / "pretrained", data, root / "accumulated")
    trainer = _trainer(root, data, callback, model, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    trainer.train()
    _assert_same_fine_tune(root, data, "accumulated", trainer)


def test_the_callback_under_torchrun_gives_the_same_fine_tune(setup):
    """2 processes with half of each batch each (DDP over gloo): the all-reduced data and proximity gradients, the
    Trainer's loss scaling, the record written by rank 0 and the factors both processes fit equal one process on the
    whole batch."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root, data = setup
    tests = Path(__file__).parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(tests / "trainer_ddp.py"),
               str(root), str(root / "ddp")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    class Logged:  # what _assert_same_fine_tune reads of the trainer: the log history rank 0 wrote
        state = type("state", (), {"log_history": json.loads((root / "ddp-log.json").read_text())})

    _assert_same_fine_tune(root, data, "ddp", Logged)
    mine, reference = Factors.load(root / "ddp-factors"), Factors.load(root / "ours-factors")  # fitted by both processes
    assert mine.metadata["documents"] == reference.metadata["documents"] == len(EXAMPLES)
    for name in reference.module_names():
        for field in ("activation_covariance", "gradient_covariance"):
            torch.testing.assert_close(getattr(mine.modules[name], field), getattr(reference.modules[name], field), rtol=1e-6, atol=1e-10)


def test_the_callback_refuses_a_trainer_without_its_loss_and_weight_decay(setup, tmp_path):
    root, data = setup
    model = load_model(root / "pretrained", "float64", torch.device("cpu"))
    callback = PretraceCallback(model, ALPHA, root / "pretrained", data, tmp_path / "out")
    trainer = _trainer(root, data, callback, model, num_train_epochs=1)
    trainer.compute_loss_func = None  # the Trainer's own token-mean loss
    with pytest.raises(PretraceError, match="compute_loss_func=callback.loss"):
        trainer.train()
    with pytest.raises(PretraceError, match="weight_decay=0.1 changes the stationary point"):
        _trainer(root, data, PretraceCallback(model, ALPHA, root / "pretrained", data, tmp_path / "out2"), model, weight_decay=0.1).train()
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_plain_pytorch_penalty_is_the_proximity_term(setup):
    root, _ = setup
    model = load_model(root / "pretrained", "float64", torch.device("cpu"))
    proximal = ProximalFinetuning(model, 0.3, root / "pretrained")
    assert proximal.penalty(model).item() == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert proximal.penalty(model).item() == pytest.approx(0.5 * 0.3 * count * 0.01**2, rel=1e-9)
    with pytest.raises(PretraceError, match="alpha must be a finite number"):
        ProximalFinetuning(model, float("nan"), root / "pretrained")
