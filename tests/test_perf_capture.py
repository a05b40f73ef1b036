"""Capture's memory: when the forward pass returns, it holds no tensor beyond those autograd keeps for the backward pass.

Tensor bytes are counted exactly (every storage an operation creates, until it is freed), not sampled from the
process's memory, so the comparison is deterministic.
"""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pretrace.data import Document
from pretrace.data.batching import encode_documents, iter_batches
from pretrace.gradients import LanguageModelingTask, capture
from pretrace.modeling.modules import select_modules
from tiny import build_tiny_model


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages created inside the `with` block and still alive (`live`)."""

    def __init__(self):
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.live = 0

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in self.sizes:
                    self.sizes[storage.data_ptr()] = storage.nbytes()
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._free, storage.data_ptr())
        return out


@pytest.mark.parametrize("arch", ["gpt_neox", "gpt2", "llama"])  # linear and Conv1D modules, with and without biases
def test_capture_adds_nothing_to_what_the_backward_pass_starts_with(arch, tokenizer, sentences):
    model = build_tiny_model(arch, tokenizer, dtype=torch.float32)
    tracked = select_modules(model)
    batch = next(iter_batches(encode_documents(tokenizer, [Document(str(i), s) for i, s in enumerate(sentences[:8])], 64), 8, tokenizer.pad_token_id))
    task = LanguageModelingTask()

    def forward(memory: LiveTensorBytes, at_end: list[int]):
        losses = task.document_loss(model, batch)
        at_end.append(memory.live)
        return losses

    for p in model.parameters():
        p.requires_grad_(False)
    for t in tracked:
        t.module.weight.requires_grad_(True)
    plain = []
    with LiveTensorBytes() as memory:  # a plain backward pass to the same weights
        torch.autograd.grad(forward(memory, plain).sum(), [t.module.weight for t in tracked])
    captured = []
    with LiveTensorBytes() as memory:
        capture(model, tracked, lambda: forward(memory, captured))
    # fails if capture copies inputs during the forward pass (the bias column) or holds outputs the graph would free
    assert captured[0] <= plain[0], f"capture holds {captured[0] - plain[0]} bytes more when the backward pass starts"
