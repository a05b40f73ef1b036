"""Proximal fine-tuning: the objective against a hand-written reference, its stationary point, records, CLI."""

import argparse
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pretrace.config import to_dict
from pretrace.data.batching import collate, encode_queries
from pretrace.data.bpe import train_bpe
from pretrace.data.records import Query
from pretrace.errors import PretraceError
from pretrace.modeling.loading import load_model, model_fingerprint
from pretrace.training import FINETUNE_RECORD, FinetuneSettings, TrainSettings, finetune, finetune_model, read_finetune_record, sequence_losses
from dense import computation_dtype, tolerance
from tiny import SENTENCES, tiny_config

QUERIES = [
    Query("0", "paris is the capital of", " france ."),
    Query("1", "berlin is the capital of", " germany ."),
    Query("2", "rome is in", " italy and madrid is in spain ."),
]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(SENTENCES * 4, 300)


def tiny_model(tokenizer, arch="gpt_neox", dtype=torch.float64, freeze_biases=False):
    """`freeze_biases`: key biases have an exactly zero gradient (softmax is shift-invariant), so Adam would
    turn their rounding noise into full steps; freezing all biases also checks that only trainable
    parameters enter the proximity term."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config(arch, len(tokenizer))
    config.pad_token_id = 0
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    for name, p in model.named_parameters():
        p.requires_grad_(not (freeze_biases and name.endswith("bias")))
    return model


def trainable(model) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def parameters(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in trainable(model)])


def reference_objective(model, tokenizer, anchor: torch.Tensor, alpha: float) -> torch.Tensor:
    """Mean over queries of the summed completion cross-entropy (each query unpadded) + α/2‖θ − θ_pt‖²."""
    losses = []
    for q in QUERIES:
        prompt, completion = tokenizer(q.prompt)["input_ids"], tokenizer(q.completion, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + completion])
        logits = model(ids).logits[0, len(prompt) - 1 : -1]
        losses.append(F.cross_entropy(logits, ids[0, len(prompt) :], reduction="sum"))
    theta = torch.cat([p.flatten() for p in trainable(model)])
    return torch.stack(losses).mean() + 0.5 * alpha * (theta - anchor).square().sum()


def full_batch(lr, epochs, **extra) -> TrainSettings:
    return TrainSettings(lr=lr, epochs=epochs, batch_size=len(QUERIES), warmup=0.0, grad_clip=0.0, device="cpu", **extra)


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_finetuning_equals_handwritten_proximal_adamw(bpe, arch, alpha):
    steps, lr = 4, 1e-2
    ours, reference = tiny_model(bpe, arch, freeze_biases=True), tiny_model(bpe, arch, freeze_biases=True)
    anchor = parameters(reference)
    optimizer = torch.optim.AdamW(trainable(reference), lr=lr, weight_decay=0.0)
    for step in range(steps):
        optimizer.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        optimizer.zero_grad()
        reference_objective(reference, bpe, anchor, alpha).backward()
        optimizer.step()
    finetune_model(ours, bpe, QUERIES, full_batch(lr, steps), alpha, progress=False)
    assert not torch.equal(parameters(ours), anchor)
    # padded batches and lone queries round differently wherever the model computes below float64 (Llama's
    # RMSNorm); in float64, Adam's normalised steps keep agreement at ~1e-9, so 1e-7 is the margin
    precision = computation_dtype(reference, lambda: reference_objective(reference, bpe, anchor, alpha))
    tol = {"rtol": 1e-7, "atol": 1e-9} if precision == torch.float64 else tolerance(precision, parameters(reference))
    torch.testing.assert_close(parameters(ours), parameters(reference), **tol)
    frozen = [name for name, p in ours.named_parameters() if not p.requires_grad]
    assert frozen and all(torch.equal(ours.get_parameter(n), reference.get_parameter(n)) for n in frozen)


def test_large_alpha_keeps_the_pretrained_weights(bpe):
    moved = {}
    for alpha in (0.0, 1e4):
        model = tiny_model(bpe)
        anchor = parameters(model)
        finetune_model(model, bpe, QUERIES, full_batch(1e-2, 20), alpha, progress=False)
        moved[alpha] = (parameters(model) - anchor).norm()
    assert moved[1e4] < 1e-2 * moved[0.0]


def test_finetuned_weights_are_a_stationary_point_of_the_proximal_objective(bpe):
    """∇L_ft(θ_ft) + α(θ_ft − θ_pt) ≈ 0 with L_ft the mean over examples of summed completion losses."""
    alpha = 30.0
    model = tiny_model(bpe)
    anchor = parameters(model)
    finetune_model(model, bpe, QUERIES, full_batch(1e-2, 300), alpha, progress=False)
    data_gradient = torch.cat([g.flatten() for g in torch.autograd.grad(reference_objective(model, bpe, anchor, 0.0), trainable(model))])
    pull = alpha * (parameters(model) - anchor)
    assert pull.norm() > 1.0  # the two terms that cancel are large
    assert (data_gradient + pull).norm() < 1e-3 * pull.norm()
    # the check tells normalisations apart: the same weights are far from stationary for a per-token mean
    examples, tokens = len(QUERIES), sum(len(bpe(q.completion, add_special_tokens=False)["input_ids"]) for q in QUERIES)
    assert (data_gradient * examples / tokens + pull).norm() > 0.1 * pull.norm()


def test_only_completion_tokens_count(bpe):
    model = tiny_model(bpe)
    batch = collate(list(encode_queries(bpe, QUERIES, 64)), pad_id=0)
    prompt_lengths = torch.tensor([len(bpe(q.prompt)["input_ids"]) for q in QUERIES])
    predicts_prompt = torch.arange(batch.input_ids.shape[1])[None, :] < (prompt_lengths[:, None] - 1)

    class Wrapper(torch.nn.Module):
        def __init__(self, where):
            super().__init__()
            self.where = where

        def forward(self, input_ids, attention_mask, position_ids):
            logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
            return SimpleNamespace(logits=logits + 5.0 * torch.randn_like(logits) * self.where[..., None])

    clean = sequence_losses(model, batch)
    torch.testing.assert_close(sequence_losses(Wrapper(predicts_prompt), batch), clean)  # prompt predictions are ignored
    assert not torch.allclose(sequence_losses(Wrapper(~predicts_prompt), batch), clean)  # completion predictions are not


@pytest.fixture()
def pretrained(tmp_path, bpe):
    folder = tmp_path / "pretrained"
    model = tiny_model(bpe, dtype=torch.float32)
    model.save_pretrained(folder)
    bpe.save_pretrained(folder)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": q.prompt, "completion": q.completion}) + "\n" for q in QUERIES))
    return SimpleNamespace(folder=folder, data=data, out=tmp_path / "finetuned")


def test_finetune_record_round_trips(pretrained):
    from pretrace.workflows import score

    settings = FinetuneSettings(model=str(pretrained.folder), data=str(pretrained.data), out=str(pretrained.out), alpha=0.3,
                                lr=1e-2, epochs=2, batch_size=2, device="cpu")
    model = finetune(settings, progress=False)
    record = read_finetune_record(pretrained.out)
    assert record["alpha"] == 0.3 and record["loss_normalisation"] == "sequence"
    assert record["pretrained_fingerprint"] == model_fingerprint(load_model(pretrained.folder))
    assert record["pretrained_path"] == str(pretrained.folder.resolve())
    assert record["settings"] == {**to_dict(settings), "max_length": 64}  # the length used: the default resolved to the model's positions
    assert record["examples"] == 3 and record["steps"] == 4
    assert torch.equal(parameters(load_model(pretrained.out)), parameters(model))
    assert read_finetune_record(pretrained.folder) is None
    assert score.FINETUNE_RECORD == FINETUNE_RECORD  # `pretrace score` reads α from the same file


def test_existing_output_is_refused_before_training(pretrained):
    pretrained.out.mkdir()
    (pretrained.out / "keep.txt").write_text("mine")
    settings = FinetuneSettings(model=str(pretrained.folder), data=str(pretrained.data), out=str(pretrained.out), alpha=0.1, device="cpu")
    settings.overwrite, settings.epochs = True, 1
    with pytest.raises(PretraceError, match="not written by pretrace"):  # a folder of the user's: never replaced
        finetune(settings, progress=False)
    assert [p.name for p in pretrained.out.iterdir()] == ["keep.txt"]
    (pretrained.out / "keep.txt").unlink()
    finetune(settings, progress=False)
    settings.overwrite = False
    with pytest.raises(PretraceError, match="--overwrite"):
        finetune(settings, progress=False)
    settings.overwrite = True
    finetune(settings, progress=False)  # a folder `pretrace finetune` wrote: replaced
    assert (pretrained.out / FINETUNE_RECORD).is_file()


def test_bad_input_is_refused(pretrained, tmp_path):
    def settings(**changes):
        values = dict(model=str(pretrained.folder), data=str(pretrained.data), out=str(pretrained.out), alpha=0.1, device="cpu")
        return FinetuneSettings(**{**values, **changes})

    with pytest.raises(PretraceError, match="no such folder"):
        finetune(settings(model=str(tmp_path / "missing")), progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"prompt": "paris is", "completion": " "}) + "\n")
    with pytest.raises(PretraceError, match="completion"):
        finetune(settings(data=str(empty)), progress=False)
    with pytest.raises(PretraceError, match="alpha"):
        settings(alpha=-1.0)
    assert not pretrained.out.exists()


def test_cli_fine_tunes_and_documents_every_flag(pretrained, capsys):
    from pretrace.cli import finetune as command

    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    sub = parser._subparsers._group_actions[0].choices["finetune"]
    assert all(action.help for action in sub._actions)
    args = parser.parse_args(["finetune", "--model", str(pretrained.folder), "--data", str(pretrained.data), "--out", str(pretrained.out),
                              "--alpha", "0.2", "--epochs", "1", "--device", "cpu"])
    assert args.handler(args) == 0
    assert read_finetune_record(pretrained.out)["alpha"] == 0.2
    assert "alpha=0.2" in capsys.readouterr().out
