"""Atomic, pickle-free storage: tensors as safetensors, metadata as JSON, folders swapped in by rename.

Commit protocol. A file is written to a temporary sibling, fsynced, renamed over its final name, and the
parent folder fsynced. A result folder is built in a temporary sibling `.OUT.XXXX.tmp/` (every file in it
fsynced) and committed in one rename; an existing result is first renamed aside to `.OUT.XXXX.old/` and
deleted only once the new one is in, so a kill leaves either result, never neither: `output_folder` (which
every command enters before any work) restores an `.old` folder whose result is missing and deletes the
stale temporaries of a dead run. Work state the commit makes obsolete (a fit's checkpoint) is renamed to a
temporary just before it, so a kill from then on recomputes rather than resumes from it. It also holds an exclusive lock `.OUT.lock` (an flock on a file holding
the writer's pid) for the whole command: a second live writer is refused, a dead one's lock is taken over.
A result's JSON is written last and names every other file with its sha256, verified on load.

Fault injection (for tests): `PRETRACE_FAULT=NAME[:N]` makes the process exit at once with code
`FAULT_EXIT_CODE` the N-th time (default 1) it reaches the write boundary NAME:
- `write`: a file's temporary is complete and fsynced, not yet renamed over its final name;
- `checkpoint`: a fit checkpoint was just saved;
- `score-checkpoint-part`: a scoring checkpoint part was just saved, its explanation state not yet;
- `score-checkpoint`: a scoring checkpoint (part and explanation state) was just saved;
- `commit`: a result folder is complete (and any old result renamed aside), not yet renamed in;
- `committed`: the result folder is in, the old result and the leftovers not yet deleted.
Unset, each boundary costs one environment lookup.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pretrace.errors import PretraceError

FAULT_ENV = "PRETRACE_FAULT"
FAULT_EXIT_CODE = 86


def fault_point(name: str) -> None:
    """Exit the process here if `PRETRACE_FAULT` names this boundary and its count runs out (see the module doc).

    The remaining count lives in the environment variable itself, so no module state is needed."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    if not (count or "1").isdigit():
        raise PretraceError(f"{FAULT_ENV}={spec!r}: the count after ':' must be a positive integer.")
    remaining = int(count or 1)
    if remaining > 1:
        os.environ[FAULT_ENV] = f"{name}:{remaining - 1}"
        return
    os.write(2, f"pretrace: injected fault at {name!r}\n".encode())
    os._exit(FAULT_EXIT_CODE)


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries (a rename is durable once its folder is synced), to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` then fsync, rename over `path` and fsync the folder: `path` is the old or the whole new file."""
    created = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        _fsync(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        if created and not any(path.parent.iterdir()):  # a folder made for this file alone (a first checkpoint) goes too
            path.parent.rmdir()
        raise
    fault_point("write")
    os.replace(tmp, path)
    _fsync(path.parent)


def write_json(path: str | Path, obj) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    _write_atomically(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_jsonl(path: str | Path, rows) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")

    _write_atomically(Path(path), write)


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise PretraceError(f"{path}: missing; is this the right folder?")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PretraceError(f"{path}: corrupt JSON ({exc}); delete the folder and recompute it.") from None


def read_json_object(path: str | Path, fix: str) -> dict:
    """`read_json` of a file whose top level must be an object; `fix` says how to recreate it."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise PretraceError(f"{path}: holds a JSON {type(value).__name__}, not an object; the file is corrupt, {fix}.")
    return value


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _write_atomically(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise PretraceError(f"{path}: missing; is this the right folder?")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise PretraceError(f"{path}: not a readable safetensors file ({exc}); delete it and recompute.") from None


def read_tensor_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata stored in a safetensors header (empty if none)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise PretraceError(f"{path}: not a readable safetensors file ({exc}); delete it and recompute.") from None


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: str | Path) -> dict:
    """What a manifest stores about a file it names: size and sha256."""
    path = Path(path)
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def verify_file(path: str | Path, record: dict | None, fix: str) -> None:
    """Refuse a file whose size or sha256 differs from its manifest `record` (bit rot, truncation, an edit)."""
    path = Path(path)
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        raise PretraceError(f"{path}: its folder records no content hash for it (written by an older pretrace or edited); {fix}.")
    if not path.is_file():
        raise PretraceError(f"{path}: missing; the folder is incomplete, {fix}.")
    if path.stat().st_size != record.get("bytes") or file_sha256(path) != record["sha256"]:
        raise PretraceError(f"{path}: content does not match the sha256 recorded beside it (corrupted or modified on disk); {fix}.")


def _temporary_kind(entry: str, name: str) -> str | None:
    """'tmp' or 'old' if `entry` is a temporary of the result folder `name` (`.NAME.XXXX.tmp` / `.old`), else None."""
    prefix = f".{name}."
    for kind in ("tmp", "old"):
        middle = entry[len(prefix):-len(kind) - 1] if entry.startswith(prefix) and entry.endswith(f".{kind}") else ""
        if middle and "." not in middle:
            return kind
    return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover_output(final: str | Path) -> None:
    """Undo what a killed commit left: restore the old result if the new one never arrived, delete temporaries.

    Call only while holding `final`'s lock (another live writer's temporaries look the same)."""
    final = Path(final)
    if not final.parent.is_dir():
        return
    leftovers = {"tmp": [], "old": []}
    for entry in final.parent.iterdir():
        kind = _temporary_kind(entry.name, final.name)
        if kind is not None:
            leftovers[kind].append(entry)
    if leftovers["old"] and not final.exists():
        newest = max(leftovers["old"], key=lambda p: p.stat().st_mtime_ns)
        os.rename(newest, final)
        leftovers["old"].remove(newest)
    for path in leftovers["tmp"] + leftovers["old"]:
        _remove(path)
    if leftovers["tmp"] or leftovers["old"]:
        _fsync(final.parent)


def _sibling(final: Path, kind: str) -> Path:
    return final.with_name(f".{final.name}.{secrets.token_hex(4)}.{kind}")


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


def _commit(tmp: Path, final: Path, discard: Iterable[Path]) -> None:
    """Rename the complete `tmp` to `final`: old result aside, new one in, then old result and `discard` deleted."""
    _fsync_tree(tmp)
    trash = []
    for path in discard:  # renamed to temporary names first: a kill from here on leaves nothing a rerun would trust
        if path.exists():
            trash.append(_sibling(final, "tmp"))
            os.rename(path, trash[-1])
    old = None
    if final.exists():
        old = _sibling(final, "old")
        os.rename(final, old)
    fault_point("commit")
    try:
        os.rename(tmp, final)
    except BaseException:
        if old is not None:
            os.rename(old, final)
        raise
    _fsync(final.parent)
    fault_point("committed")
    for path in trash + ([old] if old is not None else []):
        _remove(path)


@contextmanager
def atomic_directory(final: str | Path, overwrite: bool = False, discard: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `final` (see the commit protocol above) and the
    paths in `discard` (e.g. a checkpoint) are deleted with the old result; on failure it is deleted."""
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise PretraceError(f"{final}: exists and is not a folder; choose another --out.")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        if final.exists() and not overwrite and any(final.iterdir()):
            raise PretraceError(f"{final}: already exists and is not empty; pass --overwrite or choose another --out.")
        _commit(tmp, final, [Path(p) for p in discard])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def commit_folder(folder: str | Path, final: str | Path) -> None:
    """Rename a complete work folder (e.g. a finished resumable build) to `final` by the commit protocol above."""
    _commit(Path(folder), Path(final), ())


def read_signed_header(path: Path, key: str, signature: Any, folder: Path, run: str) -> dict:
    """The JSON object a resumable command (fit, score) keeps under `key` in a checkpoint's safetensors header,
    refused with the fix unless this version wrote it for a run with this `signature` (`run` names what may differ)."""
    try:
        meta = json.loads(read_tensor_metadata(path)[key])
    except (KeyError, ValueError):
        raise PretraceError(f"{path}: not a checkpoint of this pretrace version; delete {folder} to start over.") from None
    if not isinstance(meta, dict) or meta.get("signature") != signature:
        raise PretraceError(f"{folder}: holds a checkpoint of a different {run}; delete that folder to start over, "
                            "or rerun with the inputs and settings it was made with.")
    return meta


def checkpoint_folder(out: str | Path) -> Path:
    """Where a resumable command (fit, score) keeps its work state for `out`: beside it, deleted in the commit."""
    out = Path(out)
    return out.parent / f".{out.name}.checkpoint"


def _lock_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.lock")


@contextmanager
def _exclusive_lock(final: Path) -> Iterator[None]:
    """An flock on `.NAME.lock` holding this pid; the kernel drops it when its holder dies, so a dead writer's
    lock file is simply taken over. Retried if the file was replaced between opening and locking it."""
    path = _lock_path(final)
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "?"
            os.close(descriptor)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise PretraceError(f"{path}: cannot lock the output ({exc.strerror}); choose another --out.") from None
            raise PretraceError(
                f"{final}: another pretrace process (pid {holder}) is writing this --out; wait for it to finish or choose another --out."
            ) from None
        try:
            same = os.path.samestat(os.fstat(descriptor), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(descriptor)
    try:
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # unlinked while still locked: a waiter that opened it retries on the new file
        os.close(descriptor)


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(out: str | Path, inputs: dict[str, str | Path | None] | None = None) -> Path:
    """Refuse an --out that is a file, an input folder or inside one, or that holds an input; return it resolved."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PretraceError(f"{out}: exists and is not a folder; choose another --out.")
    resolved = out.resolve()
    if out.name in ("", "..") or resolved.parent == resolved:
        raise PretraceError(f"--out {out}: name the output folder itself (e.g. ./factors), not '.', '..' or a root; it is replaced as a whole.")
    for flag, given in (inputs or {}).items():
        if given is None:
            continue
        source = Path(given).resolve()
        if source.is_dir() and _within(resolved, source):
            where = "is" if resolved == source else "is inside"
            raise PretraceError(f"--out {out} {where} the input folder {flag} {given}; choose an --out outside the inputs.")
        if _within(source, resolved):
            raise PretraceError(f"--out {out} contains the input {flag} {given}, which writing the result would replace; choose another --out.")
    return resolved


def _check_writable(out: Path) -> None:
    """Create the parent and a scratch file in it now, not after the work: a read-only --out fails here."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        descriptor, scratch = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(descriptor)
        Path(scratch).unlink(missing_ok=True)
    except OSError as exc:
        raise PretraceError(f"--out {out}: cannot write in {out.parent} ({exc.strerror}); choose a writable --out.") from None


@contextmanager
def output_folder(out: str | Path, overwrite: bool, inputs: dict[str, str | Path | None] | None = None,
                  lock: bool = True, resume: bool = False) -> Iterator[Path]:
    """Every command's first step for its --out, before loading anything: refuse unsafe outputs (see
    `check_output`), check it is writable, lock it for the whole command, recover a killed run's commit,
    and refuse a non-empty existing folder without `overwrite`. `inputs` maps flags to the paths they name.

    `lock=False` on the ranks of a distributed job other than the writer: they validate only. `resume=True` for
    run folders whose cached stages a rerun reuses in place (trace, demo): a non-empty one is expected, not refused."""
    out = Path(out)
    check_output(out, inputs)
    _check_writable(out)
    if not lock:
        yield out
        return
    with _exclusive_lock(out):
        recover_output(out)
        if out.is_dir() and any(out.iterdir()) and not (overwrite or resume):
            raise PretraceError(f"{out}: already exists and is not empty; pass --overwrite or choose another --out.")
        yield out


def read_jsonl_rows(path: str | Path) -> list[dict]:
    """Rows of a JSONL file this library wrote."""
    with Path(path).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
