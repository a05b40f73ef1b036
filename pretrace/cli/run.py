"""`pretrace run PIPELINE`: several commands from one TOML (or JSON) file, in one process.

    [defaults]            # keys given to every step that has them (e.g. dtype, max_length, device)
    max_length = 64

    [[step]]
    run = "fit"           # any pretrace command: finetune, fit, index, score, report, trace, ...
    model = "pretrained/"
    data = "pretrain.jsonl"
    out = "factors_pt/"

A step's keys are its command's flags with '_' for '-' (`--pretrained-factors` is `pretrained_factors`; booleans
are true/false), parsed by that command's own parser, so a file and a command line accept exactly the same
settings. Every step is checked before the first one runs. Each output folder receives `pipeline.json`: the whole
pipeline with every default filled in, which `pretrace run` replays as it is, and a digest of each step that wrote
there (its settings and the contents of its input files and folders): a re-run skips a step whose digest is
unchanged, so an interrupted pipeline resumes and a changed input reruns its step.
"""

from __future__ import annotations

from pretrace.cli import COMMANDS

import argparse
import json
import time
from pathlib import Path
from typing import Any

from pretrace.errors import PretraceError

RESOLVED = "pipeline.json"
FIX_RECORD = "delete it and re-run the pipeline (its steps rerun)"
NOT_A_STEP = {"run", "bench", "demo"}  # `run` cannot nest; bench and demo are whole workflows of their own


def register(subparsers) -> None:
    parser = subparsers.add_parser("run", help=COMMANDS["run"], description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline", help="A TOML file ([defaults] and [[step]] tables) or a pipeline.json written by an earlier run.")
    parser.add_argument("--dry-run", action="store_true", help="Check every step and print the resolved pipeline without running it.")
    parser.set_defaults(handler=run)


def read_pipeline(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise PretraceError(f"{path}: no such pipeline file.")
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text(encoding="utf-8"))
        import tomllib

        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # tomllib.TOMLDecodeError and json.JSONDecodeError are ValueErrors
        raise PretraceError(f"{path}: not a valid {'JSON' if path.suffix == '.json' else 'TOML'} pipeline ({exc}).") from None


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps sub-parsers only here
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the pretrace parser has no sub-commands")


def _arguments(command: str, parser: argparse.ArgumentParser, keys: dict[str, Any], where: str) -> list[str]:
    """The command line that sets `keys`: the flag of each destination, positionals in their order."""
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", argparse.SUPPRESS)}
    unknown = sorted(set(keys) - set(actions))
    if unknown:
        raise PretraceError(f"{where}: `pretrace {command}` has no setting {', '.join(map(repr, unknown))}; "
                            f"its settings are {', '.join(sorted(actions))}.")
    argv: list[str] = []
    positionals = [a for a in parser._actions if not a.option_strings and a.dest in actions]
    for action in positionals:
        if action.dest not in keys:
            raise PretraceError(f"{where}: `pretrace {command}` needs {action.dest!r}.")
        argv.append(str(keys[action.dest]))
    for dest, value in keys.items():
        action = actions[dest]
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise PretraceError(f"{where}: {dest!r} is one value (a string, number or true/false), got {type(value).__name__} {value!r:.60}.")
        if not action.option_strings or value is None:
            continue
        flag = action.option_strings[0]  # a BooleanOptionalAction lists --flag before --no-flag
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise PretraceError(f"{where}: {dest!r} is true or false, got {value!r}.")
            argv.append(flag if value else f"--no-{flag.removeprefix('--')}")
        elif action.nargs == 0:  # store_true
            if value:
                argv.append(flag)
        else:
            argv += [flag, str(value)]
    return argv


class _Refused(Exception):
    """argparse's own message for a step, raised instead of exiting the process."""


def _parse(parser: argparse.ArgumentParser, argv: list[str], where: str) -> argparse.Namespace:
    def refuse(message: str):
        raise _Refused(message)

    parser.error, original = refuse, parser.error
    try:
        return parser.parse_args(argv)
    except _Refused as exc:
        raise PretraceError(f"{where}: {exc}") from None
    finally:
        parser.error = original


def resolve(pipeline: dict, root: argparse.ArgumentParser) -> list[tuple[str, argparse.Namespace, dict]]:
    """Each step's command, parsed arguments and resolved keys (defaults filled in); nothing runs."""
    if not isinstance(pipeline, dict) or not isinstance(pipeline.get("step"), list) or not pipeline["step"]:
        raise PretraceError("a pipeline needs at least one [[step]] table, each with run = \"COMMAND\".")
    unknown = sorted(set(pipeline) - {"defaults", "step", "step_digests", "checksum"})
    if unknown:
        raise PretraceError(f"unknown pipeline tables {unknown}; a pipeline has [defaults] and [[step]] tables.")
    defaults = pipeline.get("defaults", {})
    commands = _subparsers(root)
    used_defaults: set[str] = set()
    steps = []
    for number, step in enumerate(pipeline["step"], 1):
        command = step.get("run") if isinstance(step, dict) else None
        where = f"step {number} ({command or '?'})"
        if command not in commands or command in NOT_A_STEP:
            raise PretraceError(f"{where}: run = {command!r} is not a pipeline command; choose one of "
                                f"{sorted(set(commands) - NOT_A_STEP)}.")
        parser = commands[command]
        dests = {a.dest for a in parser._actions}
        keys = {k: v for k, v in defaults.items() if k in dests}
        used_defaults |= set(keys)
        keys.update({k: v for k, v in step.items() if k != "run"})
        args = _parse(parser, _arguments(command, parser, keys, where), where)
        resolved = {k: v for k, v in vars(args).items() if k not in ("handler", "check")}
        steps.append((command, args, resolved))
    unused = sorted(set(defaults) - used_defaults)
    if unused:
        raise PretraceError(f"[defaults] {', '.join(map(repr, unused))}: no step has such a setting.")
    return steps


def _step_digest(command: str, keys: dict, out: Path | None) -> str:
    """The step's settings and, for every setting naming an existing file or folder other than its output,
    that path's contents (a file's hash, a folder's stamp without the pipeline records)."""
    from pretrace.stages import File, Folder, digest

    inputs = {}
    for key, value in keys.items():
        path = Path(value) if isinstance(value, str) and key != "out" else None
        if path is None or (out is not None and path.resolve() == out.resolve()):
            inputs[key] = value
        elif path.is_dir():
            inputs[key] = Folder(path, exclude=(RESOLVED,))
        else:
            inputs[key] = File(path) if path.is_file() else value
    return digest(command=command, settings=inputs)


def _output(command: str, keys: dict) -> Path | None:
    """Where a step's digest is recorded: its --out, or the score folder a report without --out writes beside."""
    out = keys.get("out") or (keys.get("scores") if command == "report" else None)
    return Path(out) if out else None


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _reads(keys: dict, produced: list[Path]) -> dict[str, Path]:
    """The step's settings that name a path it reads: one that exists, or lies in an earlier step's output."""
    paths = {}
    for key, value in keys.items():
        if key == "out" or not isinstance(value, str) or not value:
            continue
        path = Path(value).resolve()
        if path.exists() or any(_within(path, out) for out in produced):
            paths[key] = path
    return paths


def check_pipeline(steps: list[tuple[str, argparse.Namespace, dict]]) -> None:
    """Every step checked before the first one runs: its settings and inputs (records included; inputs an earlier
    step produces are checked when it has), and the graph of outputs: no two steps write one --out, and no step
    writes over what another step reads."""
    writes = [Path(keys["out"]).resolve() if keys.get("out") else None for _, _, keys in steps]
    seen: dict[Path, int] = {}
    for number, out in enumerate(writes, 1):
        if out is not None and out in seen:
            raise PretraceError(f"steps {seen[out]} and {number} both write --out {out}; the second would replace the first's result. "
                                "Give each step its own out.")
        if out is not None:
            seen[out] = number
    for number, (command, args, keys) in enumerate(steps, 1):
        produced = [out for out in writes[:number - 1] if out is not None]
        for key, path in _reads(keys, produced).items():
            for later, out in enumerate(writes[number:], number + 1):
                if out is not None and (_within(path, out) or _within(out, path)):
                    raise PretraceError(f"step {later} ({steps[later - 1][0]}) writes --out {out}, which {'holds' if _within(path, out) else 'lies in'} "
                                        f"step {number}'s input {key} = {path}; a re-run would read what the later step wrote. "
                                        "Give that step another out.")
        check = getattr(args, "check", None)
        try:
            if writes[number - 1] is not None:
                _check_output(command, args, writes[number - 1], keys)
            if check is not None:
                check(args, produced)
        except PretraceError as error:
            raise PretraceError(f"step {number} ({command}): {error}") from None


def _check_output(command: str, args: argparse.Namespace, out: Path, keys: dict) -> None:
    """What the step's own command would refuse of its --out, said before any step runs: a file or a link, a folder
    pretrace did not write or another command's, or an earlier result this pipeline did not record, without overwrite."""
    from pretrace.storage import check_output, read_record, refuse_foreign

    check_output(out)
    refuse_foreign(out, command, "--out")
    recorded = (out / RESOLVED).is_file() and f"{command}:{keys.get('out')}" in read_record(out / RESOLVED, FIX_RECORD).get("step_digests", {})
    if out.is_dir() and any(out.iterdir()) and getattr(args, "overwrite", True) is False and not recorded:
        raise PretraceError(f"--out {out} already holds a `pretrace {command}` result this pipeline did not write; "
                            "set overwrite = true in the step, or give it another out.")


def _intact(out: Path | None, command: str) -> bool:
    """Whether a result this pipeline wrote still holds what it wrote (its manifest's sha256s): a damaged or edited one
    is said, and its step run again."""
    from pretrace.storage import folder_owner, verify_folder

    owner = folder_owner(out) if out is not None and out.is_dir() else None
    if owner is None or owner.get("command") != command or "files" not in owner:
        return True  # a run folder checks its own stages, a report is rewritten beside scores checked on load
    try:
        verify_folder(out, command, "its step runs again")
        return True
    except PretraceError as error:
        print(f"[pipeline] {error}", flush=True)
        return False


def _pipeline_owned(args: argparse.Namespace, out: Path | None, record: dict, name: str) -> None:
    """A step whose inputs or settings changed replaces the output this pipeline wrote for it (and only that one)."""
    if out is not None and name in record.get("step_digests", {}) and hasattr(args, "overwrite"):
        args.overwrite = True


def run(args) -> int:
    from pretrace.cli import build_parser
    from pretrace.storage import note_added, read_record, write_record

    steps = resolve(read_pipeline(args.pipeline), build_parser())
    check_pipeline(steps)
    resolved = {"step": [{"run": command, **keys} for command, _, keys in steps]}
    if args.dry_run:
        print(json.dumps(resolved, indent=2))
        return 0
    started = time.perf_counter()
    for number, (command, step_args, keys) in enumerate(steps, 1):
        name, out = f"{command}:{keys.get('out') or keys.get('scores')}", _output(command, keys)  # not its position: steps may be inserted
        step_digest = _step_digest(command, keys, out)
        record = read_record(out / RESOLVED, FIX_RECORD) if out is not None and (out / RESOLVED).is_file() else {}
        if record.get("step_digests", {}).get(name) == step_digest and _intact(out, command):
            print(f"[pipeline] step {number}/{len(steps)}: pretrace {command} -> {out} (unchanged, skipped)", flush=True)
            continue
        print(f"[pipeline] step {number}/{len(steps)}: pretrace {command}", flush=True)
        step_args.command = command
        _pipeline_owned(step_args, out, record, name)
        code = int(step_args.handler(step_args) or 0)
        if code:
            return code
        if out is not None and out.is_dir():
            # read again: the step may have replaced the folder (and with it an older record)
            done = read_record(out / RESOLVED, FIX_RECORD).get("step_digests", {}) if (out / RESOLVED).is_file() else {}
            write_record(out / RESOLVED, {**resolved, "step_digests": {**done, name: step_digest}})
            note_added(out, RESOLVED)
    print(f"[pipeline] {len(steps)} steps in {time.perf_counter() - started:.1f} s")
    return 0
