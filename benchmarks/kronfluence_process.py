"""kronfluence's whole process for `whole_process.py`: from a model folder and two JSONL files to a score matrix.

    python benchmarks/kronfluence_process.py MODEL DOCUMENTS QUERIES OUT_FOLDER [--max-length 64] [--batch-size 16] [--damping 1e-3]

What a kronfluence user writes for pretrace's `fit` + `score`: load the model and tokenizer with transformers,
tokenize like pretrace (documents whole; a query's prompt with special tokens, then its completion without),
EK-FAC on the empirical Fisher of the documents' summed next-token loss, covariances over the positions that
predict a token, every linear module inside the blocks, absolute damping; then the pairwise scores, written
as `scores.safetensors` ([queries, documents], float64). It imports nothing of pretrace, so its start-up is
kronfluence's own.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from kronfluence.utils.dataset import DataLoaderKwargs
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

BLOCK_LINEAR = re.compile(r"\.layers\.\d+\.")


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def encode(tokenizer, rows: list[dict], max_length: int) -> list[dict]:
    """Token ids and the positions whose next token is a target: a document's every token, a query's completion."""
    items = []
    for row in rows:
        if "completion" in row:
            prompt = tokenizer(row["prompt"], add_special_tokens=True)["input_ids"]
            completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
            ids, targets = prompt + completion, [False] * len(prompt) + [True] * len(completion)
        else:
            ids = tokenizer(row["text"], add_special_tokens=True)["input_ids"]
            targets = [False] + [True] * (len(ids) - 1)
        items.append({"ids": ids[:max_length], "targets": targets[:max_length]})
    return items


def collate(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; `predict_mask[t]` says position t predicts token t + 1, a target."""
    width = max(len(item["ids"]) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(items), width, dtype=torch.long)
    predict_mask = torch.zeros(len(items), width, dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["ids"])
        input_ids[row, :n] = torch.tensor(item["ids"])
        attention_mask[row, :n] = 1
        predict_mask[row, : n - 1] = torch.tensor(item["targets"][1:], dtype=torch.long)
    next_tokens = torch.cat([input_ids[:, 1:], torch.full((len(items), 1), pad_id, dtype=torch.long)], dim=1)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "predict_mask": predict_mask, "next_tokens": next_tokens}


def summed_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.flatten(0, 1)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    losses = F.cross_entropy(logits, batch["next_tokens"].flatten(), reduction="none")
    return (losses * batch["predict_mask"].flatten()).sum()


class LanguageModelingTask(Task):
    def __init__(self, modules: list[str]):
        super().__init__()
        self.modules = modules

    def compute_train_loss(self, batch, model, sample=False):
        if sample:
            raise NotImplementedError("this comparison uses the empirical Fisher.")
        return summed_loss(model, batch)

    def compute_measurement(self, batch, model):
        return summed_loss(model, batch)

    def get_influence_tracked_modules(self):
        return self.modules

    def get_attention_mask(self, batch):
        return batch["predict_mask"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("documents")
    parser.add_argument("queries")
    parser.add_argument("out", type=Path)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--damping", type=float, default=1e-3)
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    documents = encode(tokenizer, read_jsonl(args.documents), args.max_length)
    queries = encode(tokenizer, read_jsonl(args.queries), args.max_length)
    modules = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and BLOCK_LINEAR.search(name)]
    task = LanguageModelingTask(modules)
    model = prepare_model(model, task)
    analyzer = Analyzer("whole_process", model, task, cpu=True, disable_tqdm=True, output_dir=str(args.out))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loader = DataLoaderKwargs(collate_fn=lambda items: collate(items, pad_id))
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=True, eigendecomposition_dtype=torch.float64, lambda_dtype=torch.float64)
    analyzer.fit_all_factors("ekfac", documents, per_device_batch_size=args.batch_size, dataloader_kwargs=loader,
                             factor_args=factor_args, overwrite_output_dir=True)
    analyzer.compute_pairwise_scores("scores", "ekfac", query_dataset=queries, train_dataset=documents,
                                     per_device_query_batch_size=args.batch_size, per_device_train_batch_size=args.batch_size,
                                     dataloader_kwargs=loader, score_args=ScoreArguments(damping_factor=args.damping, score_dtype=torch.float64),
                                     overwrite_output_dir=True)
    scores = analyzer.load_pairwise_scores("scores")["all_modules"]
    save_file({"scores": scores.double().contiguous()}, str(args.out / "scores.safetensors"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
