"""What a user waits for, start-up included: pretrace's `fit` + `score` (two processes), the same two steps as one
`pretrace run` pipeline, and kronfluence's whole process (`kronfluence_process.py`), on the same workload.

    python benchmarks/whole_process.py [--documents 1024] [--queries 32] [--rounds 5] [--threads 1] [--work DIR] [--out PATH]

The workload (built once in --work): the demo's model and tokenizer shapes (a GPT-NeoX with hidden 64 and 2
layers, a 2,000-entry BPE fitted to Penn Treebank), saved as a Hugging Face folder; N Penn Treebank sentences as documents; Q validation
sentences split into prompt and completion as queries. Both libraries fit EK-FAC on the empirical Fisher of
the documents and score every query against every document with the same absolute damping; pretrace runs with
its defaults otherwise (explanations and top-k included, as a user gets them). The runs alternate, one of each
per round, so a drifting machine slows all alike; the table gives each one's median wall time and the median of
the per-round ratios to kronfluence. Before any time is reported the score matrices must agree (Spearman >= 0.99).

The fixed cost is broken down by the import time of torch, transformers' GPT-NeoX module and pretrace's CLI,
each in a fresh process, and by the timings `pretrace score` records in scores.json (scoring, explanations):
the rest of its wall time is start-up, loading and writing. The floor row is one process that imports,
loads, tokenizes and runs one forward and backward pass over the documents and queries: no process that
computes each of their gradients even once can take less.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "whole_process.json"
MIN_SPEARMAN = 0.99
MAX_LENGTH, BATCH_SIZE, DAMPING = 64, 16, 1e-3
VARIANTS = ("fit + score", "run pipeline", "kronfluence", "floor")


def prepare(work: Path, documents: int, queries: int) -> None:
    """The model folder and the two JSONL files, written once (a `ready` marker names their sizes)."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "pipeline.toml").write_text(PIPELINE.format(work=work, max_length=MAX_LENGTH, batch_size=BATCH_SIZE, damping=DAMPING))
    marker = work / "ready.json"
    wanted = {"documents": documents, "queries": queries}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from pretrace.data.bpe import train_bpe
    from pretrace.data.ptb import ptb_documents

    tokenizer = train_bpe((d.text for d in ptb_documents("train", limit=8000)), vocab_size=2000)
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                           max_position_embeddings=128, rotary_pct=0.25, attention_dropout=0.0, hidden_dropout=0.0,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    GPTNeoXForCausalLM(config).save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    _write_jsonl(work / "documents.jsonl", ({"id": d.id, "text": d.text} for d in ptb_documents("train", limit=documents)))
    _write_jsonl(work / "queries.jsonl", _split(ptb_documents("valid", limit=queries)))
    marker.write_text(json.dumps(wanted))


PIPELINE = """[defaults]
max_length = {max_length}
batch_size = {batch_size}

[[step]]
run = "fit"
model = "{work}/model"
data = "{work}/documents.jsonl"
out = "{work}/out/pipeline/factors"
fisher = "empirical"

[[step]]
run = "score"
model = "{work}/model"
factors = "{work}/out/pipeline/factors"
queries = "{work}/queries.jsonl"
train = "{work}/documents.jsonl"
out = "{work}/out/pipeline/scores"
damping = {damping}
"""


def _write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _split(documents) -> list[dict]:
    """A query per sentence: its first half as prompt, the rest as the measured completion."""
    rows = []
    for doc in documents:
        words = doc.text.split()
        cut = max(1, len(words) // 2)
        rows.append({"id": doc.id, "prompt": " ".join(words[:cut]), "completion": " " + " ".join(words[cut:])})
    return rows


def commands(work: Path) -> dict[str, list[list[str]]]:
    """Each variant as the processes it runs one after another."""
    pretrace = [sys.executable, "-m", "pretrace"]
    shared = ["--max-length", str(MAX_LENGTH), "--batch-size", str(BATCH_SIZE), "-q"]
    fit = [*pretrace, "fit", "--model", f"{work}/model", "--data", f"{work}/documents.jsonl", "--out", f"{work}/out/commands/factors",
           "--fisher", "empirical", *shared]
    score = [*pretrace, "score", "--model", f"{work}/model", "--factors", f"{work}/out/commands/factors", "--queries", f"{work}/queries.jsonl",
             "--train", f"{work}/documents.jsonl", "--out", f"{work}/out/commands/scores", "--damping", str(DAMPING), *shared]
    kronfluence = [sys.executable, str(ROOT / "kronfluence_process.py"), f"{work}/model", f"{work}/documents.jsonl", f"{work}/queries.jsonl",
                   f"{work}/out/kronfluence", "--max-length", str(MAX_LENGTH), "--batch-size", str(BATCH_SIZE), "--damping", str(DAMPING)]
    floor = [sys.executable, str(Path(__file__).resolve()), "--floor-process", str(work)]
    return {"fit + score": [fit, score], "run pipeline": [[*pretrace, "run", f"{work}/pipeline.toml", "-q"]], "kronfluence": [kronfluence],
            "floor": [floor]}


def floor_process(work: Path) -> None:
    """The least any process that computes each document's and query's gradient once must do: import torch and
    transformers, load the model and tokenizer, tokenize, and one forward and backward pass over every batch."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32).eval()
    rows = [json.loads(line) for name in ("documents", "queries") for line in (work / f"{name}.jsonl").open(encoding="utf-8")]
    encoded = [tokenizer(row.get("text") or row["prompt"] + row["completion"])["input_ids"][:MAX_LENGTH] for row in rows]
    for start in range(0, len(encoded), BATCH_SIZE):
        items = encoded[start:start + BATCH_SIZE]
        ids = torch.full((len(items), max(map(len, items))), tokenizer.pad_token_id)
        for row, item in enumerate(items):
            ids[row, :len(item)] = torch.tensor(item)
        logits = model(input_ids=ids).logits  # right padding: the causal mask alone keeps padding out of real positions
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()


def run_process(argv: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall seconds and peak resident bytes of one process, from the kernel's accounting of the finished child."""
    with tempfile.TemporaryFile() as stderr:  # a file, not a pipe: a chatty child never blocks on a full pipe
        start = time.perf_counter()
        child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode:
            stderr.seek(0)
            raise SystemExit(f"{' '.join(argv)} exited {child.returncode}:\n{stderr.read().decode(errors='replace')[-4000:]}")
    return seconds, usage.ru_maxrss * 1024


FOLDERS = {"fit + score": "commands", "run pipeline": "pipeline", "kronfluence": "kronfluence", "floor": "floor"}


def run_variant(name: str, processes: list[list[str]], work: Path, env: dict[str, str]) -> dict:
    """One run of a variant, from an empty output folder of its own."""
    folder = work / "out" / FOLDERS[name]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    measured = [run_process(argv, env) for argv in processes]
    return {"seconds": sum(s for s, _ in measured), "process_seconds": [s for s, _ in measured], "peak_bytes": max(b for _, b in measured)}


def agreement(work: Path, folder: str) -> dict:
    from safetensors.torch import load_file

    from pretrace.metrics import spearman
    from pretrace import load_scores

    ours = load_scores(work / "out" / folder / "scores").scores.double()
    theirs = load_file(str(work / "out" / "kronfluence" / "scores.safetensors"))["scores"]
    scale = float(theirs.abs().max())
    return {"spearman": spearman(ours, theirs), "max_abs_difference_over_max_abs_score": float((ours - theirs).abs().max()) / scale}


def import_seconds(statement: str, env: dict[str, str], repeats: int) -> float:
    """Median wall time of a fresh interpreter that runs `statement`, less that of an empty one."""
    def median(code: str) -> float:
        return statistics.median(run_process([sys.executable, "-c", code], env)[0] for _ in range(repeats))
    return median(statement) - median("pass")


def score_timings(work: Path, measured: dict) -> dict[str, float]:
    """The last `pretrace score` run's own timings, and what its process spent outside them."""
    timings = json.loads((work / "out" / "commands" / "scores" / "scores.json").read_text())["timings"]
    inside = timings["scoring_seconds"] + timings["explanation_seconds"] + timings["one_off_seconds"]
    return {"process": measured["process_seconds"][1], "one_off": timings["one_off_seconds"], "scoring": timings["scoring_seconds"],
            "explanations": timings["explanation_seconds"], "explanations_share_of_scoring": timings["explanation_seconds"] / timings["scoring_seconds"],
            "outside_scoring": measured["process_seconds"][1] - inside}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of one run of each variant")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every process (OMP_NUM_THREADS)")
    parser.add_argument("--work", type=Path, default=Path("runs/whole-process"), help="workload and outputs (rebuilt when the sizes change)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--floor-process", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.floor_process:
        floor_process(args.floor_process)
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1"}
    work = args.work.resolve()
    prepare(work, args.documents, args.queries)
    variants = commands(work)
    runs = {name: [] for name in VARIANTS}
    for _ in range(args.rounds + 1):  # the first round warms the page cache and is not counted
        for name in VARIANTS:
            runs[name].append(run_variant(name, variants[name], work, env))
            if name == "fit + score":
                phases = score_timings(work, runs[name][-1])
    agree = agreement(work, "commands")
    if agreement(work, "pipeline") != agree:
        print("the pipeline's scores differ from the two commands'.", file=sys.stderr)
        return 1
    print(f"agreement with kronfluence: Spearman {agree['spearman']:.6f}, max |difference| / max |score| {agree['max_abs_difference_over_max_abs_score']:.1e}")
    if not agree["spearman"] >= MIN_SPEARMAN:
        print(f"the libraries disagree (Spearman {agree['spearman']:.4f} < {MIN_SPEARMAN}); not reporting times.", file=sys.stderr)
        return 1
    runs = {name: measured[1:] for name, measured in runs.items()}
    summary = {name: {"median_seconds": statistics.median(r["seconds"] for r in measured),
                      "median_ratio_to_kronfluence": statistics.median(r["seconds"] / k["seconds"] for r, k in zip(measured, runs["kronfluence"])),
                      "peak_bytes": max(r["peak_bytes"] for r in measured)} for name, measured in runs.items()}
    fixed = {"torch": import_seconds("import torch", env, 3),
             "transformers GPT-NeoX": import_seconds("import torch, transformers.models.gpt_neox.modeling_gpt_neox", env, 3)
             - import_seconds("import torch", env, 3),
             "pretrace CLI (pretrace.cli)": import_seconds("import pretrace.cli", env, 3)}
    print(table(summary))
    print("\nimports, each in a fresh process: " + ", ".join(f"{k} {v:.2f} s" for k, v in fixed.items()))
    print("pretrace score's process (last round), seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": platform.processor() or platform.machine(),
              "logical_cpus": os.cpu_count(), "threads": args.threads, "documents": args.documents, "queries": args.queries,
              "rounds": args.rounds, "max_length": MAX_LENGTH, "batch_size": BATCH_SIZE, "damping": DAMPING,
              "agreement": agree, "summary": summary, "runs": runs, "imports_seconds": fixed, "score_phases_seconds": phases}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def table(summary: dict) -> str:
    rows = [("variant", "median wall s", "ratio to kronfluence (median over rounds)", "peak MB")]
    rows += [(name, f"{s['median_seconds']:.2f}", f"{s['median_ratio_to_kronfluence']:.2f}", f"{s['peak_bytes'] / 2 ** 20:.0f}") for name, s in summary.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
