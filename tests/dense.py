"""Slow, independent references: autograd loops and explicitly built dense matrices."""

from __future__ import annotations

import torch

from pretrace.data.batching import collate, encode_documents
from pretrace.gradients.task import LanguageModelingTask


def autograd_document_gradients(model, tracked, tokenizer, documents, max_length=64):
    """Per document, one backward pass of its summed loss; gradients as flat [N, P] (tracked modules in order)."""
    task = LanguageModelingTask()
    rows = []
    for encoded in encode_documents(tokenizer, documents, max_length):
        batch = collate([encoded], pad_id=0)
        model.zero_grad(set_to_none=True)
        task.document_loss(model, batch).sum().backward()
        rows.append(torch.cat([t.weight_gradient().flatten() for t in tracked]).detach().clone())
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


def flatten(grads: dict, tracked) -> torch.Tensor:
    return torch.cat([grads[t.name].flatten(1) for t in tracked], dim=1)


def unflatten(flat: torch.Tensor, tracked) -> dict:
    out, offset = {}, 0
    for t in tracked:
        n = t.num_parameters
        out[t.name] = flat[:, offset : offset + n].reshape(-1, t.d_out, t.d_in_total)
        offset += n
    return out


def dense_eigenbasis_matrix(qa, qg, eigenvalues, damping):
    """Block-diagonal (over output blocks) (Q_G ⊗ Q_A) diag(eigenvalues + λ) (Q_G ⊗ Q_A)ᵀ for row-major vec(W)."""
    blocks = []
    for k in range(qg.shape[0]):
        kron = torch.kron(qg[k].double(), qa.double())
        blocks.append(kron @ torch.diag(eigenvalues[k].double().flatten() + damping) @ kron.T)
    return torch.block_diag(*blocks)
