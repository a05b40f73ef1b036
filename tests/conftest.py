import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))

import pytest
import torch

torch.set_num_threads(1)  # tiny models: threads only add overhead


@pytest.fixture(scope="session")
def tokenizer():
    from tiny import train_tokenizer

    return train_tokenizer()


@pytest.fixture(scope="session")
def sentences():
    from tiny import SENTENCES

    return list(SENTENCES)
