"""`pretrace report SCORES_DIR`: one self-contained HTML page of a score folder's top documents (results first, plots
embedded, the settings that mattered folded away) and the same plots as PNG files beside it."""

from __future__ import annotations

from pretrace.cli import COMMANDS

from pathlib import Path

from pretrace.errors import PretraceError


def register(subparsers) -> None:
    parser = subparsers.add_parser("report", help=COMMANDS["report"], description=__doc__)
    parser.add_argument("scores", help="A folder written by `pretrace score` (uses its top_k.jsonl and scores.json).")
    parser.add_argument("--out", default=None, help="Folder for report.html and the PNG plots (default: the score folder).")
    parser.add_argument("--title", default="pretrace: influential training documents", help="Page title. (default: %(default)s)")
    parser.add_argument("--max-documents", type=int, default=None, help="Show at most this many documents per query.")
    parser.set_defaults(handler=run, check=check)


def check(args, produced) -> None:
    """The score folder, before any work (see `pretrace.cli.checks`)."""
    from pretrace.cli.checks import produced_by_earlier
    from pretrace.scores.io import load_scores

    if args.max_documents is not None and args.max_documents < 1:
        raise PretraceError(f"--max-documents must be at least 1, got {args.max_documents}.")
    if not produced_by_earlier(args.scores, produced):
        load_scores(args.scores)


def run(args) -> int:
    from pretrace.scores.io import load_scores, require_finite
    from pretrace.storage import output_folder

    folder = Path(args.scores)
    if args.max_documents is not None and args.max_documents < 1:
        raise PretraceError(f"--max-documents must be at least 1, got {args.max_documents}.")
    tensors, meta = load_scores(folder)
    require_finite({"scores": tensors["scores"]}, meta.get("method"))  # before any file of the report is written
    if args.out is None:  # beside the scores: files the score folder's manifest does not list, never its own
        return _write(args, folder, folder, tensors, meta)
    with output_folder(args.out, False, {"SCORES": folder}, command="report", resume=True) as out:
        return _write(args, folder, out, tensors, meta)


def _write(args, folder: Path, out: Path, tensors: dict, meta: dict) -> int:
    """Render the page and plots into a temporary sibling folder, then rename each into `out`: a failure (a full disk)
    leaves no part of a new report; beside the scores, the files are recorded in the score folder's marker."""
    import os
    import shutil
    import tempfile

    from pretrace.storage import note_added

    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        names = _render(args, folder, staging, tensors, meta)
        for name in names:
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if out == folder:
        note_added(folder, *names)
    print(f"report -> {out / 'report.html'}")
    return 0


def _render(args, folder: Path, out: Path, tensors: dict, meta: dict) -> list[str]:
    """Draw each plot once: written beside report.html as a PNG file and embedded in it."""
    from pretrace.report import layer_influence_png, load_results, score_distributions_png, write_png, write_report
    from pretrace.report.html import LAYERS_CAPTION
    from pretrace.scores.io import TOP_K_FILE

    rows = load_results(folder / TOP_K_FILE)
    plots = {"score_distributions.png": ("All scores of the folder: pooled (left), and by rank per query (right).",
                                         score_distributions_png(tensors["scores"], query_ids=meta["query_ids"]))}
    if any("module_scores" in doc for row in rows for doc in row["documents"]):
        plots["layer_influence.png"] = (LAYERS_CAPTION, layer_influence_png(rows))
    for name, (_, png) in plots.items():
        write_png(png, out / name)
    write_report(rows, out / "report.html", title=args.title, run_info=_run_info(meta), max_documents=args.max_documents,
                 figures=dict(plots.values()))
    return sorted(p.name for p in out.iterdir())


def _run_info(meta: dict) -> dict:
    """What scores.json says about how the scores were made; the report shows the part that shaped them."""
    keys = ("method", "multi_stage", "alpha", "settings", "hyperparameters", "timings")
    return {key: meta.get(key) for key in keys}
