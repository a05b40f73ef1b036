"""A billion-parameter model on one CPU machine: the memory plan against the measured peak, and the wall time.

    python benchmarks/billion.py [--out runs/billion] [--budget-gb 22] [--dtype float32|bfloat16] [--last-blocks N]
                                 [--fit-documents 64] [--documents 256] [--queries 8] [--json benchmarks/results/billion.json]

A Llama with TinyLlama-1.1B's shapes (hidden 2048, 22 layers, 32 heads of which 4 key/value, MLP 5632, vocabulary
32000), randomly initialised from a config (nothing is downloaded), in float32; a second copy, its weights
perturbed by 1e-3 of their scale, stands in for a fine-tune (α = 0.01 recorded for it). Fit on --fit-documents
documents × 128 tokens over the tracked modules, then multi-stage score of --queries queries against --documents
documents. The tracked modules are those of the last --last-blocks blocks, or by default the largest set the plan
fits in --budget-gb: every linear module of the blocks if it can, else those of the last blocks only (the script
says which); the backward pass stops at the first tracked block, the forward pass runs the whole model. Each command runs in its own process, which prints its plan and its
measured peak; the table compares them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
              max_position_embeddings=2048)


def build_models(out: Path) -> None:
    """The two models (saved once), a word-level tokenizer over the Penn Treebank, and the documents and queries."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pretrace.data.bpe import train_bpe
    from pretrace.data.ptb import ptb_documents
    from pretrace.storage import write_json, write_jsonl

    documents = ptb_documents("train", limit=20000)
    tokenizer = train_bpe((d.text for d in documents), vocab_size=SHAPES["vocab_size"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPES, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                         bos_token_id=tokenizer.bos_token_id)).eval()
    model.save_pretrained(out / "pretrained")
    tokenizer.save_pretrained(out / "pretrained")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1e-3 * parameter.std() * torch.randn_like(parameter))
    model.save_pretrained(out / "finetuned")
    tokenizer.save_pretrained(out / "finetuned")
    write_json(out / "finetuned" / "pretrace_finetune.json", {"alpha": 0.01, "note": "a perturbed copy standing in for a fine-tune"})
    long = [" ".join(d.text for d in documents[i:i + 6]) for i in range(0, 6 * 256, 6)]  # about 128 tokens each
    write_jsonl(out / "fit.jsonl", ({"id": f"f{i}", "text": t} for i, t in enumerate(long[:64])))
    write_jsonl(out / "train.jsonl", ({"id": f"d{i}", "text": t} for i, t in enumerate(long)))
    write_jsonl(out / "queries.jsonl", ({"id": f"q{i}", "prompt": " ".join(t.split()[:20]), "completion": " " + " ".join(t.split()[20:24])}
                                        for i, t in enumerate(long[:8])))
    write_jsonl(out / "pairs.jsonl", ({"prompt": " ".join(t.split()[:20]), "completion": " " + " ".join(t.split()[20:24])} for t in long[8:72]))


def choose_modules(out: Path, budget_gb: float, dtype: str, choices: tuple[int, ...], queries: int, documents: int) -> str | None:
    """The largest module set whose fit and score plans both fit the budget: all blocks, else the last 8, 4, 2, 1."""
    from pretrace.modeling.memory import fit_plan, model_shapes, score_plan
    from pretrace.modeling.stage import ModelOptions

    for last in choices:
        regex = None if last == 22 else r"layers\.(" + "|".join(str(i) for i in range(22 - last, 22)) + r")\."
        shapes = model_shapes(out / "pretrained", ModelOptions(modules=regex, max_length=128, dtype=dtype))
        fits = fit_plan(shapes, 8, 128, "float32").total, score_plan(shapes, 8, 128, queries, documents, 2, None, False).total
        print(f"last {last} blocks: fit plan {fits[0] / 1e9:.1f} GB, score plan {fits[1] / 1e9:.1f} GB", flush=True)
        if max(fits) <= budget_gb * 1e9:
            return regex
    raise SystemExit("no module set fits the budget")


def run(out: Path, *argv: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pretrace", *argv], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"pretrace {argv[0]} failed:\n{result.stderr[-3000:]}")
    planned = re.search(r"memory plan of `pretrace \w+`: ([\d.]+) GB \((.*)\)", result.stderr)
    measured = re.search(r"peak memory: measured ([\d.]+) GB, planned ([\d.]+) GB \(([\d.]+)x\)", result.stderr)
    return {"seconds": seconds, "planned_gb": float(measured.group(2)), "measured_gb": float(measured.group(1)),
            "measured_over_planned": float(measured.group(3)), "plan_parts": planned.group(2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/billion")
    parser.add_argument("--budget-gb", type=float, default=22.0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--last-blocks", type=int, default=None, help="track the last N blocks (default: the most the plan fits)")
    parser.add_argument("--fit-documents", type=int, default=64)
    parser.add_argument("--documents", type=int, default=256)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "billion.json"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "queries.jsonl").is_file():
        build_models(out)
    regex = choose_modules(out, args.budget_gb, args.dtype, (args.last_blocks,) if args.last_blocks else (22, 8, 4, 2, 1), args.queries, args.documents)
    for name, count in (("fit", args.fit_documents), ("train", args.documents), ("queries", args.queries)):
        rows = (out / f"{name}.jsonl").read_text().splitlines()[:count]
        (out / f"{name}-{count}.jsonl").write_text("\n".join(rows) + "\n")
    common = ["--max-length", "128", "--batch-size", "8", "--device", "cpu", "--dtype", args.dtype, "--memory-gb", str(args.budget_gb)]
    common += ["--modules", regex] if regex else []
    results = {"machine": f"{os.cpu_count()} CPU cores", "date": time.strftime("%Y-%m-%d"), "dtype": args.dtype, "modules": regex or "every linear module of the 22 blocks",
               "fit_documents": args.fit_documents, "documents": args.documents, "queries": args.queries}
    results["fit_pretrained"] = run(out, "fit", "--model", str(out / "pretrained"), "--data", str(out / f"fit-{args.fit_documents}.jsonl"), "--out", str(out / "factors-pt"),
                                    "--overwrite", *common)
    results["fit_finetuned"] = run(out, "fit", "--model", str(out / "finetuned"), "--data", str(out / "pairs.jsonl"), "--out", str(out / "factors-ft"),
                                   "--overwrite", *common)
    results["score_multi_stage"] = run(out, "score", "--pretrained", str(out / "pretrained"), "--finetuned", str(out / "finetuned"), "--force",
                                       "--pretrained-factors", str(out / "factors-pt"), "--finetuned-factors", str(out / "factors-ft"),
                                       "--queries", str(out / f"queries-{args.queries}.jsonl"), "--train", str(out / f"train-{args.documents}.jsonl"), "--out", str(out / "scores"),
                                       "--overwrite", "--no-explain", *common)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\n{args.dtype}, {args.fit_documents} fit documents, {args.queries} queries x {args.documents} documents")
    print(f"{'step':<20}{'wall':>10}{'planned':>10}{'measured':>10}{'ratio':>8}   modules: {results['modules']}")
    for step in ("fit_pretrained", "fit_finetuned", "score_multi_stage"):
        r = results[step]
        print(f"{step:<20}{r['seconds'] / 60:>8.1f} m{r['planned_gb']:>8.2f} GB{r['measured_gb']:>7.2f} GB{r['measured_over_planned']:>8.2f}")


if __name__ == "__main__":
    main()
