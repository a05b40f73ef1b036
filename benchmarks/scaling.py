"""Wall time and peak memory of `pretrace fit` and `pretrace score` with 1 and N processes, against corpus size.

    python benchmarks/scaling.py [--documents 100 200 400] [--processes 1 2] [--out benchmarks/results/scaling.json]

A tiny GPT-NeoX (BPE tokenizer fitted to Penn Treebank) scores PTB sentences. Each run is the real CLI
(`python -m pretrace` or `torchrun --nproc-per-node N -m pretrace`) wrapped so that every process reports
its own time and peak resident memory (getrusage maxrss). Each process runs --threads threads (default 1:
on a small shared machine, N single-threaded processes against one measure what sharding itself buys).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER = "--worker"


def _worker(report: str, argv: list[str]) -> int:
    """Run the CLI in this process and write this rank's seconds and peak memory next to `report`.

    Imports come before the clock starts: on a tiny model they would otherwise dominate the time."""
    import transformers.models.gpt_neox.modeling_gpt_neox  # noqa: F401  (the model class the CLI loads)

    from pretrace.cli import build_parser, main

    build_parser()
    start = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - start
    rank = int(os.environ.get("RANK", 0))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    Path(f"{report}.rank{rank}.json").write_text(json.dumps({"rank": rank, "seconds": seconds, "peak_rss_mb": peak_mb}))
    return code


def _build_model(folder: Path, vocab_size: int) -> None:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from pretrace.data.bpe import train_bpe
    from pretrace.data.ptb import ptb_documents

    tokenizer = train_bpe((doc.text for doc in ptb_documents("train", limit=5000)), vocab_size)
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                           max_position_embeddings=128, rotary_pct=0.25, attention_dropout=0.0, hidden_dropout=0.0,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    GPTNeoXForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _write_data(folder: Path, documents: int, queries: int) -> tuple[Path, Path]:
    from pretrace.data.ptb import ptb_documents, write_documents_jsonl
    from pretrace.storage import write_jsonl

    docs = folder / f"docs-{documents}.jsonl"
    write_documents_jsonl(docs, ptb_documents("train", limit=documents))
    rows = []
    for doc in ptb_documents("valid", limit=queries):
        words = doc.text.split()
        cut = max(1, len(words) // 2)
        rows.append({"id": doc.id, "prompt": " ".join(words[:cut]), "completion": " " + " ".join(words[cut:])})
    query_path = folder / f"queries-{queries}.jsonl"
    write_jsonl(query_path, rows)
    return docs, query_path


def _run(processes: int, threads: int, argv: list[str], report: Path) -> dict:
    """One CLI command on `processes` processes: end-to-end seconds plus each rank's report."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))}
    launcher = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    start = time.perf_counter()
    done = subprocess.run([*launcher, __file__, WORKER, str(report), *argv], env=env, capture_output=True, text=True)
    total = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"command failed ({done.returncode}): {' '.join(argv)}\n{done.stderr[-3000:]}")
    ranks = [json.loads(Path(f"{report}.rank{r}.json").read_text()) for r in range(processes)]
    return {
        "command_seconds": total,
        "seconds": max(r["seconds"] for r in ranks),
        "peak_rss_mb": [round(r["peak_rss_mb"], 1) for r in ranks],
    }


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == WORKER:
        return _worker(sys.argv[2], sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--documents", type=int, nargs="+", default=[100, 200, 400])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--vocab-size", type=int, default=1000)
    parser.add_argument("--scores-on-disk", action="store_true", help="score with --scores-on-disk")
    parser.add_argument("--out", default="benchmarks/results/scaling.json")
    args = parser.parse_args()

    rows = []
    print(f"{'documents':>9} {'processes':>9} {'fit s':>8} {'score s':>8} {'fit MB/proc':>11} {'score MB/proc':>13}")
    with tempfile.TemporaryDirectory(prefix="pretrace-scaling-") as tmp:
        work = Path(tmp)
        _build_model(work / "model", args.vocab_size)
        for documents in args.documents:
            docs, queries = _write_data(work, documents, args.queries)
            for processes in args.processes:
                tag = f"n{documents}-p{processes}"
                common = ["--batch-size", str(args.batch_size), "--device", "cpu"]
                fit = _run(processes, args.threads, ["fit", "--model", str(work / "model"), "--data", str(docs), "--out", str(work / f"factors-{tag}"), *common], work / f"fit-{tag}")
                score_argv = ["score", "--model", str(work / "model"), "--factors", str(work / f"factors-{tag}"), "--queries", str(queries),
                              "--train", str(docs), "--out", str(work / f"scores-{tag}"), "--no-explain", *common]
                if args.scores_on_disk:
                    score_argv.append("--scores-on-disk")
                score = _run(processes, args.threads, score_argv, work / f"score-{tag}")
                rows.append({"documents": documents, "processes": processes, "fit": fit, "score": score})
                print(f"{documents:>9} {processes:>9} {fit['seconds']:>8.2f} {score['seconds']:>8.2f}"
                      f" {max(fit['peak_rss_mb']):>11.0f} {max(score['peak_rss_mb']):>13.0f}", flush=True)
    import torch

    record = {
        "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "load_average": os.getloadavg()},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "note": "seconds: the CLI call in the slowest process, after imports (model loading, fitting or scoring, writing); "
                "command_seconds: the whole launch; peak_rss_mb: per process",
        "runs": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
