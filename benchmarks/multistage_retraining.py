"""Multi-stage influence against the ground truth of retraining both stages without each document.

    python benchmarks/multistage_retraining.py [--documents 60] [--hidden-size 8] [--weight-decay 1e-2]
        [--alpha 1e-1] [--finetuning broad|capitals] [--fisher true|empirical] [--label-repeats 16] [--seeds 0 1]
        [--out benchmarks/results/multistage_retraining.json]

A 1-layer GPT-NeoX whose MLP is pre-trained on capital-city facts (+ filler sentences) and proximally
fine-tuned on six capitals is retrained, to convergence, once per removed pre-training document; the
change of the loss on six held-out capital questions is compared with the prediction score/N of the
exact-Hessian and EK-FAC multi-stage influence, both single-stage EK-FAC variants and the gradient dot product.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

import torch

from pretrace.bench.retraining import RetrainingSettings, compare_influences, correlations
from pretrace.storage import write_json


def main() -> None:
    defaults = RetrainingSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=defaults.documents)
    parser.add_argument("--hidden-size", type=int, default=defaults.hidden_size)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--alpha", type=float, default=defaults.alpha)
    parser.add_argument("--finetuning", choices=("broad", "capitals"), default=defaults.finetuning,
                        help="fine-tuning set: capital questions mixed with other completions (broad) or capital questions only")
    parser.add_argument("--fisher", choices=("true", "empirical"), default=defaults.fisher)
    parser.add_argument("--label-repeats", type=int, default=defaults.label_repeats)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/multistage_retraining.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    runs = []
    for seed in args.seeds:
        settings = RetrainingSettings(documents=args.documents, hidden_size=args.hidden_size, weight_decay=args.weight_decay,
                                      alpha=args.alpha, finetuning=args.finetuning, label_repeats=args.label_repeats, fisher=args.fisher, seed=seed)
        start = time.perf_counter()
        result = compare_influences(settings)
        seconds = time.perf_counter() - start
        table = {name: correlations(result["actual"], predicted) for name, predicted in result["predicted"].items()}
        runs.append({"settings": asdict(settings), "seconds": seconds, "correlations": table,
                     "actual": result["actual"].tolist(), "predicted": {k: v.tolist() for k, v in result["predicted"].items()}})
        print(f"\nseed {seed}: {settings.documents} documents removed one at a time, {seconds:.0f} s")
        print(f"{'method':<26}{'pearson (pooled)':>18}{'pearson (per query)':>21}{'spearman (per query)':>22}")
        for name, row in table.items():
            print(f"{name:<26}{row['pearson_pooled']:>18.3f}{row['pearson_per_query']:>21.3f}{row['spearman_per_query']:>22.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, {"runs": runs})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
