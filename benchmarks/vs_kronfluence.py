"""pretrace against kronfluence on the same model, data and settings: do the scores agree, and how fast is each?

    python benchmarks/vs_kronfluence.py [--size tiny|smollm] [--documents N] [--queries Q] [--repeats 3] [--query-rank R] [--out PATH]

Both libraries fit EK-FAC on the empirical Fisher of the same documents (summed next-token loss per
document, the same tracked linear modules, lm_head and embeddings excluded) and score Q queries (summed
loss of the completion) against the N documents with the same absolute damping. The script checks the
two score matrices agree (Spearman >= 0.99) before it reports times: factor fitting, pairwise scoring and
peak memory of each, and the floor, one plain forward+backward pass over the same documents and queries.

To make the curvature identical, kronfluence's covariance mask is the positions that predict a token
(pretrace's `predict_mask`) rather than the attention mask: the last token of a sequence predicts
nothing, and with the attention mask its input would enter A in kronfluence but not in pretrace.
kronfluence's `damping_factor` is absolute when given (0.1 x mean eigenvalue only when None), as is
pretrace's `damping`. kronfluence keeps factors and scores on disk (a temporary folder) and reads them
back; its times include that I/O. Peak memory is the growth of resident memory over the phase
(sampled every 2 ms) on CPU, or peak allocated memory on CUDA. One eigendecomposition runs before anything is
measured, so the process's one-off LAPACK setup counts against neither library.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import importlib.util
import json
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from pretrace.curvature import EKFAC, FitSettings, fit_factors
from pretrace.data import Document, Query
from pretrace.data.batching import Encoded, TokenBatch, collate, encode_documents, encode_queries
from pretrace.metrics import spearman
from pretrace.modeling.modules import select_modules
from pretrace.scores import score_documents
from pretrace.scores.queries import precondition_queries

MIN_SPEARMAN = 0.99
RESULTS = Path(__file__).resolve().parent / "results" / "vs_kronfluence.json"


def kronfluence_available() -> bool:
    return importlib.util.find_spec("kronfluence") is not None


@dataclass
class Workload:
    """What both libraries see: a model, its tracked module names, encoded documents and queries."""

    model: torch.nn.Module
    module_names: list[str]
    documents: list[Encoded]
    queries: list[Encoded]
    pad_id: int
    batch_size: int
    damping: float

    def batches(self, items: Sequence[Encoded]) -> list[TokenBatch]:
        """Right-padded batches (identical positions with or without explicit position ids)."""
        return [collate(items[i:i + self.batch_size], self.pad_id, "right") for i in range(0, len(items), self.batch_size)]


class PeakMemory:
    """Peak memory growth (bytes) inside a `with` block: CUDA allocator peak, else resident set size sampled by a thread."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - self._base)
            time.sleep(0.002)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        _release_freed_memory()
        self._base, self._stop = self._rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss() - self._base)


def _release_freed_memory() -> None:
    """Hand memory freed by earlier phases back to the OS, so one phase's peak is not hidden by another's leftovers."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: peaks may then be underestimated
        pass


def _timed(device: torch.device, work: Callable[[], object]) -> tuple[object, float, int]:
    """(result, seconds, peak bytes) of `work()`."""
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        result = work()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return result, seconds, memory.peak


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def run_pretrace(work: Workload, query_rank: int | None = None) -> tuple[torch.Tensor, dict]:
    """EK-FAC on the empirical Fisher, then [Q, N] scores; times and peak memory of both phases. With
    `query_rank`, the same factors also score with rank-truncated query weights (`low_rank_*` measures:
    time, memory, the weights' relative Frobenius error, and Spearman and relative error against full rank)."""
    model, device = work.model, _device(work.model)
    names = set(work.module_names)
    tracked = [t for t in select_modules(model) if t.name in names]
    dtype = next(model.parameters()).dtype
    settings = FitSettings(fisher="empirical", factor_dtype="float64" if dtype == torch.float64 else "float32")
    doc_batches, query_batches = work.batches(work.documents), work.batches(work.queries)
    factors, fit_s, fit_mem = _timed(device, lambda: fit_factors(model, tracked, lambda: doc_batches, settings, progress=False))

    def score(rank):
        queries = precondition_queries(model, tracked, query_batches, EKFAC(factors, damping=work.damping), query_rank=rank)
        scores = score_documents(model, tracked, queries.weights, doc_batches, queries.ids, num_batches=len(doc_batches)).scores
        return scores.double().cpu(), queries.relative_error

    (scores, _), score_s, score_mem = _timed(device, lambda: score(None))
    measures = {"fit_seconds": fit_s, "score_seconds": score_s, "fit_peak_bytes": fit_mem, "score_peak_bytes": score_mem}
    if query_rank is not None:
        (low, error), low_s, low_mem = _timed(device, lambda: score(query_rank))
        measures.update(low_rank_score_seconds=low_s, low_rank_score_peak_bytes=low_mem, low_rank_query_relative_error=float(error.mean()),
                        low_rank_spearman_vs_full_rank=spearman(low, scores), low_rank_relative_score_error=float((low - scores).norm() / scores.norm()))
    return scores, measures


def _kronfluence_batch(batch: TokenBatch) -> dict[str, torch.Tensor]:
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "predict_mask": batch.predict_mask, "next_tokens": batch.next_tokens}


def _summed_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over predicting positions, written independently of pretrace's."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32))
    losses = F.cross_entropy(logits, batch["next_tokens"].flatten(), reduction="none")
    return (losses * batch["predict_mask"].flatten()).sum()


def kronfluence_task(module_names: list[str], covariance_mask: str = "predict_mask"):
    """A kronfluence Task with pretrace's losses (summed target-token loss) and covariances over `covariance_mask` positions."""
    from kronfluence.task import Task

    class LanguageModelingTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            if sample:
                raise NotImplementedError("this comparison uses the empirical Fisher (use_empirical_fisher=True).")
            return _summed_loss(model, batch)

        def compute_measurement(self, batch, model):
            return _summed_loss(model, batch)

        def get_influence_tracked_modules(self):
            return list(module_names)

        def get_attention_mask(self, batch):
            return batch[covariance_mask]

    return LanguageModelingTask()


def run_kronfluence(work: Workload, folder: str | Path, covariance_mask: str = "predict_mask") -> tuple[torch.Tensor, dict]:
    """kronfluence's EK-FAC (empirical Fisher, absolute damping) on a copy of the model: scores and timings.

    `covariance_mask="attention_mask"` is kronfluence's usual choice for language models (A then also holds
    each sequence's last input, which predicts nothing)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    device = _device(work.model)
    dtype = next(work.model.parameters()).dtype
    task = kronfluence_task(work.module_names, covariance_mask)
    model = prepare_model(copy.deepcopy(work.model), task)
    analyzer = Analyzer("vs_pretrace", model, task, cpu=device.type == "cpu", disable_tqdm=True, output_dir=str(folder))
    pad_id = work.pad_id
    loader = DataLoaderKwargs(collate_fn=lambda items: _kronfluence_batch(collate(items, pad_id, "right")))
    factor_args = FactorArguments(
        strategy="ekfac", use_empirical_fisher=True, activation_covariance_dtype=dtype, gradient_covariance_dtype=dtype,
        eigendecomposition_dtype=torch.float64, per_sample_gradient_dtype=dtype, lambda_dtype=torch.float64,
    )
    score_args = ScoreArguments(damping_factor=work.damping, per_sample_gradient_dtype=dtype, precondition_dtype=dtype, score_dtype=torch.float64)

    def fit():
        analyzer.fit_all_factors("ekfac", list(work.documents), per_device_batch_size=work.batch_size,
                                 dataloader_kwargs=loader, factor_args=factor_args, overwrite_output_dir=True)

    def score():
        analyzer.compute_pairwise_scores(
            "scores", "ekfac", query_dataset=list(work.queries), train_dataset=list(work.documents),
            per_device_query_batch_size=work.batch_size, per_device_train_batch_size=work.batch_size,
            dataloader_kwargs=loader, score_args=score_args, overwrite_output_dir=True,
        )
        return analyzer.load_pairwise_scores("scores")["all_modules"]

    _, fit_s, fit_mem = _timed(device, fit)
    scores, score_s, score_mem = _timed(device, score)
    return scores.double().cpu(), {"fit_seconds": fit_s, "score_seconds": score_s, "fit_peak_bytes": fit_mem, "score_peak_bytes": score_mem}


def warm_up_eigh(work: Workload) -> None:
    """One float64 eigendecomposition of the largest factor's size before anything is measured. The first LAPACK call
    of a process sets up MKL's buffers and pages in its code (10-17 MB on the tiny model), which would otherwise
    count against whichever library eigendecomposes first (pretrace, as it runs before kronfluence)."""
    names = set(work.module_names)
    size = max(max(t.d_in_total, t.block_size) for t in select_modules(work.model) if t.name in names)
    device = _device(work.model)
    x = torch.randn(size, size, dtype=torch.float64, device=device, generator=torch.Generator(device).manual_seed(0))  # global RNG untouched
    torch.linalg.eigh(x @ x.T)


def run_floor(work: Workload) -> dict:
    """One plain forward+backward pass (gradients of every parameter) over the documents and the queries."""
    model, device = work.model, _device(work.model)
    batches = [_kronfluence_batch(b.to(device)) for b in work.batches(work.documents) + work.batches(work.queries)]
    flags = {p: p.requires_grad for p in model.parameters()}

    def passes():
        for p in model.parameters():
            p.requires_grad_(True)
        for batch in batches:
            _summed_loss(model, batch).backward()
        model.zero_grad(set_to_none=True)

    try:
        _, seconds, peak = _timed(device, passes)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return {"seconds": seconds, "peak_bytes": peak}


def best_of(repeats: int, run: Callable[[], tuple[object, dict]]) -> tuple[object, dict]:
    """Run `repeats` times: the last result, and per measure the fastest time and the largest peak (a shared machine is noisy)."""
    result, measures = None, []
    for _ in range(repeats):
        result, measure = run()
        measures.append(measure)
    return result, {key: (min if key.endswith("seconds") else max)(m[key] for m in measures) for key in measures[0]}


def agreement(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    """Spearman over all pairs and the largest difference relative to the largest score."""
    scale = float(theirs.abs().max())
    return {
        "spearman": spearman(ours, theirs),
        "max_abs_difference_over_max_abs_score": float((ours - theirs).abs().max()) / scale if scale > 0 else float("nan"),
        "same_sign_fraction": float(((ours > 0) == (theirs > 0)).double().mean()),
    }


def _split_queries(documents: list[Document]) -> list[Query]:
    """A query per sentence: its first half as prompt, the rest as the measured completion."""
    queries = []
    for doc in documents:
        words = doc.text.split()
        cut = max(1, len(words) // 2)
        queries.append(Query(doc.id, " ".join(words[:cut]), " " + " ".join(words[cut:])))
    return queries


def tiny_workload(documents: int, queries: int, batch_size: int, damping: float, max_length: int = 64) -> Workload:
    """A 2-layer GPT-NeoX (hidden 64) with a BPE tokenizer fitted to Penn Treebank; PTB sentences as documents."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from pretrace.data.bpe import train_bpe
    from pretrace.data.ptb import ptb_documents

    tokenizer = train_bpe((doc.text for doc in ptb_documents("train", limit=5000)), 1000)
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                           max_position_embeddings=128, rotary_pct=0.25, attention_dropout=0.0, hidden_dropout=0.0,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    model = GPTNeoXForCausalLM(config).eval()
    docs = ptb_documents("train", limit=documents)
    return Workload(model, [t.name for t in select_modules(model)], list(encode_documents(tokenizer, docs, max_length)),
                    list(encode_queries(tokenizer, _split_queries(ptb_documents("valid", limit=queries)), max_length)),
                    tokenizer.pad_token_id, batch_size, damping)


def smollm_workload(documents: int, queries: int, batch_size: int, damping: float, max_length: int = 64) -> Workload:
    """SmolLM2-135M with its MLP projections tracked; PTB sentences as documents."""
    from pretrace.data.ptb import ptb_documents
    from pretrace.modeling.loading import load_model, load_tokenizer, pad_token_id
    from pretrace.modeling.smollm import ensure_smollm2

    folder = ensure_smollm2()
    tokenizer = load_tokenizer(str(folder))
    model = load_model(str(folder), dtype="float32").eval()
    docs = ptb_documents("train", limit=documents)
    return Workload(model, [t.name for t in select_modules(model, preset="mlp")], list(encode_documents(tokenizer, docs, max_length)),
                    list(encode_queries(tokenizer, _split_queries(ptb_documents("valid", limit=queries)), max_length)),
                    pad_token_id(tokenizer), batch_size, damping)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report(pretrace: dict, kronfluence: dict, floor: dict) -> str:
    mb = 2 ** 20
    rows = [("phase", "pretrace s", "kronfluence s", "pretrace/kronfluence", "pretrace/floor", "pretrace MB", "kronfluence MB")]
    for phase in ("fit", "score"):
        ours, theirs = pretrace[f"{phase}_seconds"], kronfluence[f"{phase}_seconds"]
        rows.append((phase, f"{ours:.3f}", f"{theirs:.3f}", f"{ours / theirs:.2f}", f"{ours / floor['seconds']:.2f}",
                     f"{pretrace[f'{phase}_peak_bytes'] / mb:.1f}", f"{kronfluence[f'{phase}_peak_bytes'] / mb:.1f}"))
    rows.append(("floor (fwd+bwd)", f"{floor['seconds']:.3f}", "", "", "1.00", f"{floor['peak_bytes'] / mb:.1f}", ""))
    return _table(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("tiny", "smollm"), default="tiny")
    parser.add_argument("--documents", type=int, help="documents N (default: 256 tiny, 8 smollm)")
    parser.add_argument("--queries", type=int, help="queries Q (default: 16 tiny, 4 smollm)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--damping", type=float, default=1e-3, help="absolute damping added to every eigenvalue, in both libraries")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each library; the fastest time is reported")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--query-rank", type=int, help="also score with each preconditioned query gradient truncated to this rank per module, and report its error")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON file of results, one entry per --size (others are kept)")
    args = parser.parse_args(argv)
    if not kronfluence_available():
        print("kronfluence is not installed: pip install --no-deps kronfluence==1.0.1 einops einconv opt-einsum", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    defaults = {"tiny": (256, 16), "smollm": (8, 4)}[args.size]
    build = tiny_workload if args.size == "tiny" else smollm_workload
    work = build(args.documents or defaults[0], args.queries or defaults[1], args.batch_size, args.damping)
    work.model.to(args.device)
    warm_up_eigh(work)
    floor = best_of(args.repeats, lambda: (None, run_floor(work)))[1]
    ours, pretrace = best_of(args.repeats, lambda: run_pretrace(work, args.query_rank))
    with tempfile.TemporaryDirectory() as folder:
        theirs, kronfluence = best_of(args.repeats, lambda: run_kronfluence(work, folder))
    agree = agreement(ours, theirs)
    print(f"agreement: Spearman {agree['spearman']:.6f}, max |difference| / max |score| {agree['max_abs_difference_over_max_abs_score']:.2e}")
    if not agree["spearman"] >= MIN_SPEARMAN:
        print(f"the libraries disagree (Spearman {agree['spearman']:.4f} < {MIN_SPEARMAN}); not reporting speed.", file=sys.stderr)
        return 1
    print(report(pretrace, kronfluence, floor))
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": _cpu_name(), "logical_cpus": os.cpu_count(),
        "size": args.size, "documents": len(work.documents), "queries": len(work.queries), "batch_size": args.batch_size,
        "damping": args.damping, "repeats": args.repeats, "device": args.device, "threads": args.threads, "dtype": str(next(work.model.parameters()).dtype),
        "tokens": sum(len(e.input_ids) for e in work.documents), "modules": work.module_names,
        "machine": platform.machine(), "torch": torch.__version__,
        "agreement": agree, "pretrace": pretrace, "kronfluence": kronfluence, "floor": floor,
        "ratios": {f"{phase}_{kind}": pretrace[f"{phase}_seconds"] / (kronfluence[f"{phase}_seconds"] if kind == "vs_kronfluence" else floor["seconds"])
                   for phase in ("fit", "score") for kind in ("vs_kronfluence", "vs_floor")},
    }
    if args.query_rank is not None:
        result["query_rank"] = args.query_rank
        print(f"rank-{args.query_rank} queries: " + ", ".join(f"{k} {v:.4g}" for k, v in pretrace.items() if k.startswith("low_rank")))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results = {key: value for key, value in previous.items() if key in ("tiny", "smollm")}  # a pre-size-keyed file is replaced
    results[args.size] = result
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
