"""`pretrace inspect DIR`: what a factor or score folder holds."""

from __future__ import annotations

from pretrace.cli import COMMANDS

import json
from pathlib import Path

from pretrace.errors import PretraceError


def register(subparsers) -> None:
    parser = subparsers.add_parser("inspect", help=COMMANDS["inspect"], description=__doc__)
    parser.add_argument("folder", help="A folder written by `pretrace fit` or `pretrace score`.")
    parser.add_argument("--json", action="store_true", help="Print the full metadata as JSON.")
    parser.set_defaults(handler=run)


def _describe_factors(folder: Path, as_json: bool) -> None:
    from pretrace.curvature.factors import Factors

    factors = Factors.load(folder)
    meta = factors.metadata
    if as_json:
        print(json.dumps(meta, indent=2))
        return
    print(f"factor folder {folder}")
    print(f"  model: {meta.get('model')} ({meta.get('model_type')}, fingerprint {str(meta.get('model_fingerprint'))[:12]})")
    print(f"  data: {meta.get('data')} (sha256 {str(meta.get('data_sha256'))[:12]}), {meta.get('documents')} documents, {meta.get('tokens')} tokens")
    print(f"  settings: {meta.get('settings')}")
    print(f"  {'module':<55} {'blocks':>6} {'d_out':>6} {'d_in':>6} {'mean Λ':>10}")
    for name, mf in factors.modules.items():
        nb, bs, din = mf.lambda_.shape
        print(f"  {name:<55} {nb:>6} {nb * bs:>6} {din:>6} {float(mf.lambda_.double().mean()):>10.3e}")


def _describe_scores(folder: Path, as_json: bool) -> None:
    import torch

    from pretrace.scores.io import load_scores

    tensors, meta = load_scores(folder)
    if as_json:
        print(json.dumps({k: v for k, v in meta.items() if k not in ("document_ids",)}, indent=2))
        return
    scores = tensors["scores"]
    print(f"score folder {folder}: method {meta['method']}{' (multi-stage)' if meta.get('multi_stage') else ''}")
    finite = scores[torch.isfinite(scores)]
    bad = scores.numel() - finite.numel()
    extent = f"min {float(finite.min()):.4g}, max {float(finite.max()):.4g}" if finite.numel() else "no finite value"
    warning = f"; {bad} NaN or infinite values, written before pretrace refused them: recompute with `pretrace score`" if bad else ""
    print(f"  scores: {list(scores.shape)} (queries x documents), {extent}{warning}")
    print(f"  tensors: {', '.join(f'{k} {list(v.shape)}' for k, v in tensors.items())}")
    print("  timings: " + ", ".join(f"{k}={v:.3g}s" for k, v in meta.get("timings", {}).items()))
    print(f"  hyper-parameters: {meta.get('hyperparameters')}")


def run(args) -> int:
    folder = Path(args.folder)
    if (folder / "factors.json").is_file():
        _describe_factors(folder, args.json)
    elif (folder / "scores.json").is_file():
        _describe_scores(folder, args.json)
    else:
        raise PretraceError(f"{folder}: neither a factor folder (factors.json) nor a score folder (scores.json).")
    return 0
