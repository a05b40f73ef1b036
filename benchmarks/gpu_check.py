"""The GPU check: pretrace on one GPU against the same work on the CPU, its throughput against the forward+backward
floor of the same GPU, and its peak memory against the plan. One command, no network needed:

    python benchmarks/gpu_check.py [--json gpu_check.json]          # on a GPU machine, about 5 minutes on an H100
    python benchmarks/gpu_check.py --device cpu --reduced             # the same code paths, small, on the CPU (run by the tests)

It uses the machine's torch and transformers and pretrace from this source tree (run it from the repository root);
models are built from configs. Checked, each a row of the table and an entry of the JSON:
- multi-stage fit and score in float32 and bfloat16 on the device equal the CPU's float32 results for a small case,
  within 1e-4 (float32) and 32 × 2^-8 (bfloat16) relative error;
- fit, score and the corpus store's build throughput, each as a ratio to a plain forward+backward pass over the same
  batches on the same device;
- the peak device memory (torch.cuda.max_memory_allocated) against the memory plan's prediction;
- --factors-device cpu gives the scores of factors on the device;
- kronfluence on the same workload and device (benchmarks/vs_kronfluence.py), where its wheel was brought along.
Not covered: --shard-factors, which needs several ranks (torchrun) and is tested on the CPU with gloo.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _model(hidden: int, layers: int, vocabulary: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                                        num_key_value_heads=max(1, hidden // 128), vocab_size=vocabulary, max_position_embeddings=512)).eval()


def _world(folder: Path, reduced: bool) -> dict:
    """Tokenizer, documents, queries, fine-tuning pairs and two models (a pre-trained and a perturbed copy)."""
    import torch

    from pretrace.data.bpe import train_bpe
    from pretrace.data.ptb import ptb_documents

    texts = [d.text for d in ptb_documents("train", limit=2000)]
    tokenizer = train_bpe(texts, vocab_size=1000)
    hidden, layers = (64, 2) if reduced else (512, 8)
    pretrained = _model(hidden, layers, len(tokenizer))
    finetuned = _model(hidden, layers, len(tokenizer))
    with torch.no_grad():
        for p, q in zip(pretrained.parameters(), finetuned.parameters()):
            q.copy_(p + 1e-3 * p.std() * torch.randn_like(p))
    finetuned.pretrace_finetune = {"alpha": 0.01}
    documents = texts[: 64 if reduced else 1024]
    pairs = [{"prompt": " ".join(t.split()[:8]), "completion": " " + " ".join(t.split()[8:11])} for t in texts[1000:1064] if len(t.split()) > 11]
    return {"tokenizer": tokenizer, "pretrained": pretrained, "finetuned": finetuned, "documents": documents, "pairs": pairs, "queries": pairs[:8]}


def _multi_stage(world: dict, device: str, dtype: str, **settings):
    import torch

    import pretrace

    cast = getattr(torch, dtype)
    pt, ft = (copy.deepcopy(world[name]).to(device=device, dtype=cast) for name in ("pretrained", "finetuned"))  # the world's models stay float32
    ft.pretrace_finetune = world["finetuned"].pretrace_finetune
    common = dict(tokenizer=world["tokenizer"], max_length=64, batch_size=16, progress=False)
    pt_factors = pretrace.fit(pt, world["documents"], **common)
    ft_factors = pretrace.fit(ft, world["pairs"], **common)
    start = time.perf_counter()
    result = pretrace.score(world["queries"], world["documents"], pretrained=pt, finetuned=ft, pretrained_factors=pt_factors,
                            finetuned_factors=ft_factors, explain=False, **common, **settings)
    return result.scores.double().cpu(), time.perf_counter() - start


def check_agreement(world: dict, device: str) -> dict:
    """float32 and bfloat16 on the device against float32 on the CPU."""
    reference, _ = _multi_stage(world, "cpu", "float32")
    rows = {}
    for dtype, tolerance in (("float32", 1e-4), ("bfloat16", 32 * 2.0 ** -8)):
        scores, seconds = _multi_stage(world, device, dtype)
        error = float((scores - reference).norm() / reference.norm())
        rows[dtype] = {"relative_error": error, "tolerance": tolerance, "passed": error < tolerance, "score_seconds": seconds}
    if device != "cpu":
        scores, _ = _multi_stage(world, device, "float32", factors_device="cpu")
        error = float((scores - reference).norm() / reference.norm())
        rows["factors_device_cpu"] = {"relative_error": error, "tolerance": 1e-4, "passed": error < 1e-4}
    return rows


def check_throughput(world: dict, device: str, folder: Path) -> dict:
    """Documents per second of fit, score and the store build, each over the floor: one forward+backward pass."""
    import torch

    import pretrace
    from pretrace.data.batching import encode_documents, iter_batches, pad_token_id
    from pretrace.gradients.task import LanguageModelingTask

    model, tokenizer, documents = world["pretrained"].to(device=device, dtype=torch.float32), world["tokenizer"], world["documents"]
    batches = list(iter_batches(encode_documents(tokenizer, [pretrace.Document(str(i), t) for i, t in enumerate(documents)], 64), 16, pad_token_id(tokenizer)))
    task = LanguageModelingTask()

    def synchronised(work) -> float:
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        work()
        if device != "cpu":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    floor = synchronised(lambda: [task.document_loss(model, b.to(device)).sum().backward() for b in batches])
    model.zero_grad(set_to_none=True)
    common = dict(tokenizer=tokenizer, max_length=64, batch_size=16, progress=False)
    factors = {}
    fit = synchronised(lambda: factors.setdefault("f", pretrace.fit(model, documents, **common))) / 2  # two passes
    score = synchronised(lambda: pretrace.score(world["queries"], documents, model=model, factors=factors["f"], explain=False, **common))
    store = synchronised(lambda: pretrace.index(model, documents, folder / "store", storage="sketch", sketch_dim=16, search="flat", **common))
    rate = lambda seconds: len(documents) / seconds
    return {"floor_documents_per_second": rate(floor), **{f"{name}_over_floor": seconds / floor for name, seconds in
                                                          (("fit_pass", fit), ("score", score), ("store_build", store))}}


def check_memory(world: dict, device: str) -> dict | None:
    """Peak device memory of a multi-stage score against its plan (GPU only: the CPU's peak is the process's)."""
    if device == "cpu":
        return None
    import torch

    from pretrace.modeling.memory import model_shapes, score_plan
    from pretrace.modeling.stage import ModelOptions

    torch.cuda.reset_peak_memory_stats(device)
    _multi_stage(world, device, "float32")
    measured = torch.cuda.max_memory_allocated(device)
    shapes = model_shapes(None, ModelOptions(max_length=64), world["pretrained"])
    plan = score_plan(shapes, 16, 64, len(world["queries"]), len(world["documents"]), 2, None, False)
    device_parts = plan.total - plan.parts["runtime"]  # the interpreter's arenas live in host memory
    return {"measured_bytes": measured, "planned_bytes": device_parts, "measured_over_planned": measured / device_parts}


def check_kronfluence(device: str, scratch: Path) -> dict:
    """benchmarks/vs_kronfluence.py's tiny workload (its speed, memory and agreement) on this device, where the
    kronfluence wheel was brought along; else why not."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("kronfluence") is None:
        return {"skipped": "kronfluence is not installed here (carry its wheel to compare)"}
    out = scratch / "vs_kronfluence.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vs_kronfluence.py"), "--size", "tiny", "--device", device, "--repeats", "1",
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    if result.returncode:
        return {"failed": result.stderr[-2000:]}
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--reduced", action="store_true", help="small models and corpus (the CPU check of the tests)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    import torch

    if args.device != "cpu" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; run with --device cpu --reduced for the CPU check.")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        world = _world(Path(scratch), args.reduced)
        report = {"device": torch.cuda.get_device_name() if args.device != "cpu" else "cpu", "torch": torch.__version__,
                  "agreement": check_agreement(world, args.device), "throughput": check_throughput(world, args.device, Path(scratch)),
                  "memory": check_memory(world, args.device),
                  "kronfluence": check_kronfluence(args.device, Path(scratch)) if not args.reduced else {"skipped": "--reduced"}}
    report["seconds"] = time.perf_counter() - start
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
