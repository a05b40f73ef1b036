"""Tiny randomly initialised causal LMs of every supported architecture, with a small trained tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = (
    "the cat sat on the mat . a dog ran in the park . paris is the capital of france . "
    "berlin is the capital of germany . the sun is hot and the moon is cold . "
    "rome is in italy and madrid is in spain . birds can fly and fish can swim ."
).split()

SENTENCES = [
    "the cat sat on the mat .",
    "a dog ran in the park .",
    "paris is the capital of france .",
    "berlin is the capital of germany .",
    "the sun is hot and the moon is cold .",
    "rome is in italy and madrid is in spain .",
    "birds can fly and fish can swim .",
    "the dog sat in the sun .",
]


def train_tokenizer(vocab_size: int | None = None):
    """A word-level tokenizer over the tiny vocabulary (~50 tokens): small enough for dense Hessians."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<unk>": 1}
    for word in WORDS + [w for s in SENTENCES for w in s.split()]:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<unk>")


def tiny_config(arch: str, vocab_size: int):
    from transformers import BloomConfig, GPT2Config, GPTNeoXConfig, LlamaConfig

    if arch == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=32, rotary_pct=0.5, max_position_embeddings=64, use_parallel_residual=True,
                             attention_dropout=0.0, hidden_dropout=0.0)
    if arch == "bloom":
        return BloomConfig(vocab_size=vocab_size, hidden_size=16, n_layer=2, n_head=2, hidden_dropout=0.0, attention_dropout=0.0)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, n_embd=16, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if arch == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=32, max_position_embeddings=64, attention_bias=True)
    raise ValueError(arch)


def build_tiny_model(arch: str, tokenizer, seed: int = 0, dtype=torch.float64):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, len(tokenizer))
    config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    return model


def save_tiny_model(folder: Path, arch: str = "gpt_neox", seed: int = 0, dtype=torch.float64) -> Path:
    tokenizer = train_tokenizer()
    model = build_tiny_model(arch, tokenizer, seed=seed, dtype=dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows) -> str:
    """Write records as JSONL and return the path as a string (what settings take)."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def tiny_workspace(root: Path, dtype=torch.float32) -> Path:
    """`root/model` (a tiny GPT-NeoX), `root/docs.jsonl` (the sentences, ids d0…) and `root/q.jsonl` (one query)."""
    save_tiny_model(root / "model", "gpt_neox", dtype=dtype)
    write_jsonl(root / "docs.jsonl", [{"id": f"d{i}", "text": s} for i, s in enumerate(SENTENCES)])
    write_jsonl(root / "q.jsonl", [{"prompt": "paris is the capital of", "completion": " france ."}])
    return root


def assert_refused(code: int, capsys, *needles: str) -> str:
    """A clean refusal: exit 2, no traceback, every needle in the message; returns stderr."""
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err[-2000:]
    return err


def random_documents(n: int, seed: int = 0) -> list:
    """`n` documents of 4-9 random words of WORDS, ids d0, d1, ..."""
    import random

    from pretrace.data.records import Document

    rng = random.Random(seed)
    return [Document(f"d{i}", " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9)))) for i in range(n)]


def document_batches(tokenizer, documents, batch_size: int = 3, max_length: int = 64):
    """The documents' token batches, as the workflows make them."""
    from pretrace.data.batching import encode_documents, iter_batches

    return iter_batches(encode_documents(tokenizer, documents, max_length), batch_size, tokenizer.pad_token_id)


def interrupted(batches, after: int):
    """`batches`, then a KeyboardInterrupt in place of batch number `after`: a build killed mid-way."""
    for number, batch in enumerate(batches):
        if number == after:
            raise KeyboardInterrupt
        yield batch
