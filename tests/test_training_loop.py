"""The shared training loop and pre-training: schedule, loss normalisations, weights, saved folders."""

import math

import pytest
import torch
import torch.nn.functional as F

from pretrace.data.batching import collate, encode_documents
from pretrace.data.bpe import train_bpe
from pretrace.data.records import Document
from pretrace.errors import PretraceError
from pretrace.modeling.loading import load_model, load_tokenizer
from pretrace.storage import read_json
from pretrace.training import PRETRAIN_RECORD, TrainSettings, batch_loss, evaluate, pretrain, sequence_losses, train
from tiny import SENTENCES, tiny_config


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(SENTENCES * 4, 300)


@pytest.fixture(scope="module")
def documents():
    return [Document(str(i), s) for i, s in enumerate(SENTENCES)]


def tiny_model(tokenizer, arch="gpt_neox", dtype=torch.float64, seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer))).to(dtype)


def reference_losses(model, tokenizer, documents):
    """Summed next-token cross-entropy of each document, one unpadded sequence at a time."""
    out = []
    for doc in documents:
        ids = torch.tensor([tokenizer(doc.text)["input_ids"]])
        out.append(F.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="sum"))
    return torch.stack(out)


def test_learning_rate_follows_warmup_then_cosine_per_optimizer_step(bpe, documents):
    items = list(encode_documents(bpe, documents[:6], 64))
    settings = TrainSettings(lr=0.1, epochs=2, batch_size=2, warmup=0.34, device="cpu")  # 3 steps an epoch, 2 warm-up
    history = train(tiny_model(bpe), items, settings, pad_id=0, progress=False)
    cosine = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    expected = [0.1 * f for f in [0.5, 1.0] + cosine]
    assert history.steps == 6
    assert history.learning_rates == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("normalisation", ["token", "sequence"])
def test_batch_loss_weights_and_normalises_summed_losses(bpe, documents, normalisation):
    model = tiny_model(bpe)
    batch = collate(list(encode_documents(bpe, documents[:4], 64)), pad_id=0)
    weights = {"0": 0.0, "2": 3.0}
    reference = reference_losses(model, bpe, documents[:4])
    w = torch.tensor([0.0, 1.0, 3.0, 1.0], dtype=torch.float64)
    denominator = sum(len(bpe(d.text)["input_ids"]) - 1 for d in documents[:4]) if normalisation == "token" else 4
    ours = batch_loss(sequence_losses(model, batch), batch, normalisation, weights)
    torch.testing.assert_close(ours, (w * reference).sum() / denominator)


def test_training_reduces_loss_and_is_seeded(bpe, documents):
    items = list(encode_documents(bpe, documents, 64))
    settings = TrainSettings(lr=1e-2, epochs=15, batch_size=4, device="cpu", seed=3)
    models = [tiny_model(bpe), tiny_model(bpe)]
    before = evaluate(models[0], items, 8, pad_id=0)
    for model in models:
        history = train(model, items, settings, pad_id=0, validation=items, progress=False)
    after = evaluate(models[0], items, 8, pad_id=0)
    assert after < 0.6 * before
    assert history.validation_losses[-1] == pytest.approx(after)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)


def test_pretrain_saves_a_loadable_model_folder(tmp_path, bpe, documents):
    config = tiny_config("llama", 10)  # the tokenizer's vocabulary replaces the config's
    settings = TrainSettings(lr=1e-2, epochs=3, batch_size=4, device="cpu")
    model = pretrain(config, bpe, documents, settings, validation=documents[:2], out=tmp_path / "pt", progress=False)
    record = read_json(tmp_path / "pt" / PRETRAIN_RECORD)
    assert record["documents"] == len(documents) and record["steps"] == 6 and len(record["validation_losses"]) == 3
    assert model.config.vocab_size == len(bpe) and model.config.pad_token_id == 0
    loaded = load_model(tmp_path / "pt")
    for a, b in zip(model.parameters(), loaded.parameters()):
        assert torch.equal(a, b)
    assert load_tokenizer(tmp_path / "pt").get_vocab() == bpe.get_vocab()
    with pytest.raises(PretraceError, match="not empty"):
        pretrain(config, bpe, documents, settings, out=tmp_path / "pt", progress=False)


def test_pretrain_builds_the_seed_toy_config(tmp_path, bpe, documents):
    from pathlib import Path

    seed_config = Path(__file__).resolve().parents[2] / "shared" / "seed" / "toy_gpt_neox_config.json"  # the shared folder beside the repository
    if not seed_config.is_file():
        pytest.skip("the seed's toy config is not on this machine")
    model = pretrain(seed_config, bpe, documents[:2], TrainSettings(epochs=1, batch_size=2, device="cpu"), progress=False)
    assert model.config.hidden_size == 256 and model.config.vocab_size == len(bpe)
    assert next(model.parameters()).dtype == torch.float32  # not the config's float16


@pytest.mark.parametrize("bad,message", [({"lr": 0}, "--lr must be a finite number > 0"), ({"epochs": 0}, "--epochs must be at least 1"),
                                         ({"batch_size": 0}, "--batch-size must be at least 1"), ({"warmup": 1.0}, r"--warmup must be a finite number >= 0 and < 1"),
                                         ({"grad_clip": -1}, "--grad-clip must be a finite number >= 0"), ({"max_length": 1}, "--max-length must be at least 2")])
def test_bad_settings_are_refused(bad, message):
    with pytest.raises(PretraceError, match=message):
        TrainSettings(**bad)


def test_empty_training_data_is_refused(bpe):
    with pytest.raises(PretraceError, match="no training data"):
        train(tiny_model(bpe), [], TrainSettings(device="cpu"), pad_id=0)
