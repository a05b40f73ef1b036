"""Atomic, pickle-free storage: tensors as safetensors, metadata as JSON, folders swapped in by rename.

Commit protocol. A file is written to a temporary sibling, fsynced, renamed over its final name, and the
parent folder fsynced. A result folder is built in a temporary sibling `.OUT.XXXX.tmp/` (every file in it
fsynced) and committed in one rename; an existing result is first renamed aside to `.OUT.XXXX.old/` and
deleted only once the new one is in, so a kill leaves either result, never neither: `output_folder` (which
every command enters before any work) restores an `.old` folder whose result is missing and deletes the
stale temporaries of a dead run. Work state the commit makes obsolete (a fit's checkpoint) is renamed to a
temporary just before it, so a kill from then on recomputes rather than resumes from it. It also holds an exclusive lock `.OUT.lock` (an flock on a file holding
the writer's pid) for the whole command: a second live writer is refused, a dead one's lock is taken over.
Ownership and integrity. Every folder pretrace writes holds `.pretrace.json`: the command that wrote it and,
for a committed result folder, the size and sha256 of every file in it (written at the commit, verified by
`verify_folder` when the result is read back). `--overwrite` replaces only a folder whose marker names the same
command; any other non-empty folder is refused. Work state that is read back before a commit (checkpoints,
partial builds) carries its own seal instead: a safetensors file's header holds the sha256 of its tensors and
metadata (`write_tensors(seal=True)`), a JSON record a `checksum` key (`write_record`). A mismatch raises
`CorruptFile`: work state is then recomputed (and said), a result refused.

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
import mmap
import os
import secrets
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pretrace.errors import CorruptFile, PretraceError

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


def disk_full(error: BaseException) -> bool:
    """Whether a write failed because the disk (or quota) is full: an OSError says so by its errno, the writers
    of other libraries (safetensors' SafetensorError, a tokenizer's save) only in their message."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text


def no_space(path: str | Path) -> OSError:
    """The one error every writer raises for a full disk, whatever library was writing (the CLI turns it into a refusal)."""
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` then fsync, rename over `path` and fsync the folder: `path` is the old or the whole new file."""
    created = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        _fsync(tmp)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if created and not any(path.parent.iterdir()):  # a folder made for this file alone (a first checkpoint) goes too
            path.parent.rmdir()
        if disk_full(error):
            raise no_space(path) from None
        raise
    fault_point("write")
    os.replace(tmp, path)
    _fsync(path.parent)


def allocate(path: str | Path) -> None:
    """Reserve the disk blocks of a (sparse) file about to be written through a memory map: a full disk then fails
    here, as a refusal, instead of killing the process with SIGBUS at the first page it cannot write."""
    descriptor = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(descriptor, 0, os.fstat(descriptor).st_size)
    except OSError as error:
        if disk_full(error):
            raise no_space(path) from None
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system that cannot reserve: written as it goes
            raise
    finally:
        os.close(descriptor)


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


CHECKSUM_KEY = "checksum"
SEAL_KEY = "pretrace_sealed"


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=_json_default).encode("utf-8", "surrogatepass")


def write_record(path: str | Path, obj: dict) -> None:
    """A JSON object pretrace reads back as state (stage cache, pipeline digests, build progress), sealed with the
    sha256 of its content under `checksum`, so `read_record` notices any change made on disk."""
    stored = json.loads(json.dumps(obj, default=_json_default))  # the checksum is over what is stored (Paths as strings, ...)
    write_json(path, {**stored, CHECKSUM_KEY: hashlib.sha256(_canonical(stored)).hexdigest()})


def read_record(path: str | Path, fix: str) -> dict:
    """A `write_record` object, its checksum verified (`CorruptFile` names `fix` when it does not match)."""
    try:
        value = read_json_object(path, fix)
    except CorruptFile:
        raise
    except PretraceError as error:
        if Path(path).is_file():  # unreadable JSON is corruption too
            raise CorruptFile(str(error)) from None
        raise
    recorded = value.pop(CHECKSUM_KEY, None)
    if recorded != hashlib.sha256(_canonical(value)).hexdigest():
        raise CorruptFile(f"{path}: does not match the checksum written with it (modified or corrupted on disk); {fix}.")
    return value


def _tensors_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 over the metadata and every tensor's name, dtype, shape and bytes: a seal no bit can change unnoticed."""
    digest = hashlib.sha256(_canonical(metadata))
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                  seal: bool = False) -> None:
    """Tensors as safetensors, atomically; `seal=True` (work state read back before any manifest covers it) stores
    the sha256 of tensors and metadata in the header, which `read_tensors` and `read_sealed` verify. A sealed file's
    metadata is kept under one header key (safetensors orders several keys differently from run to run: one key
    keeps a resumed run's files byte-identical to an uninterrupted one's)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = dict(metadata or {})
    if seal:
        metadata = {SEAL_KEY: json.dumps({"metadata": metadata, "sha256": _tensors_digest(tensors, metadata)}, sort_keys=True)}
    _write_atomically(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata or None))


def _unseal(path: Path, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> dict[str, str]:
    """The metadata a sealed file was written with, after checking its seal (`CorruptFile` if anything changed)."""
    try:
        sealed = json.loads(header[SEAL_KEY])
        metadata, recorded = sealed["metadata"], sealed["sha256"]
    except (KeyError, TypeError, ValueError):
        raise CorruptFile(f"{path}: has no readable seal (not written by this pretrace version, or corrupted on disk)") from None
    if not isinstance(metadata, dict) or recorded != _tensors_digest(tensors, metadata):
        raise CorruptFile(f"{path}: does not match the seal written with it (modified or corrupted on disk)")
    return metadata


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise PretraceError(f"{path}: missing; is this the right folder?")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}, handle.metadata() or {}
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise CorruptFile(f"{path}: not a readable safetensors file ({exc}); delete it and recompute.") from None


def read_sealed(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A sealed safetensors file's tensors and metadata, verified: `CorruptFile` for an unreadable file, a missing
    seal or any changed bit."""
    tensors, header = _load(Path(path))
    return tensors, _unseal(Path(path), tensors, header)


SAFETENSORS_DTYPES = {"F16": "float16", "F32": "float32", "F64": "float64", "BF16": None, "I64": "int64", "I32": "int32"}


class RowFile:
    """A 2-D tensor of a safetensors file read by rows on demand (`file[start:stop]`, `file[indices]`, copies),
    never held in RAM: a read-only memory map whose pages are released from the process after each read
    (madvise DONTNEED; they stay in the kernel's cache), so touching a whole store does not grow the process's
    resident memory. The file's contents are verified elsewhere (its folder's manifest, or its seal when it is read
    whole)."""

    def __init__(self, path: str | Path, name: str):
        self.path = Path(path)
        try:
            with self.path.open("rb") as handle:
                length = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(length))
            entry = header[name]
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            start, end = entry["data_offsets"]
            shape = tuple(int(n) for n in entry["shape"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CorruptFile(f"{self.path}: not a safetensors file holding {name!r} ({error.__class__.__name__})") from None
        if dtype is None or len(shape) != 2:
            raise PretraceError(f"{self.path}: {name!r} is a {entry['dtype']} tensor of shape {shape}, not rows numpy can read.")
        if end - start != numpy.dtype(dtype).itemsize * shape[0] * shape[1]:
            raise CorruptFile(f"{self.path}: {name!r} has {end - start} bytes, not what its shape {shape} needs")
        with self.path.open("rb") as handle:
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        self._rows = numpy.frombuffer(self._map, dtype=dtype, count=shape[0] * shape[1], offset=8 + length + start).reshape(shape)
        self.shape = shape

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: slice | numpy.ndarray) -> numpy.ndarray:
        rows = numpy.array(self._rows[key])
        if hasattr(mmap, "MADV_DONTNEED"):  # Linux and macOS; elsewhere the pages stay mapped
            self._map.madvise(mmap.MADV_DONTNEED)
        return rows


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; a sealed one's seal is verified (`CorruptFile` if it does not match)."""
    tensors, header = _load(Path(path))
    if SEAL_KEY in header:
        _unseal(Path(path), tensors, header)
    return tensors


def read_tensor_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata stored in a safetensors header (empty if none)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise CorruptFile(f"{path}: not a readable safetensors file ({exc}); delete it and recompute.") from None


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
        raise CorruptFile(f"{path}: content does not match the sha256 recorded beside it (corrupted or modified on disk); {fix}.")


def _temporary_kind(entry: str, name: str) -> str | None:
    """'tmp' or 'old' if `entry` is a temporary of the result folder `name`, else None: exactly the names pretrace
    makes (`.NAME.` + 8 characters of `tempfile.mkdtemp` or `secrets.token_hex(4)` + `.tmp`/`.old`), so a file of the
    user's that merely looks alike is never deleted."""
    prefix = f".{name}."
    for kind in ("tmp", "old"):
        middle = entry[len(prefix):-len(kind) - 1] if entry.startswith(prefix) and entry.endswith(f".{kind}") else ""
        if len(middle) == 8 and all(c in "abcdefghijklmnopqrstuvwxyz0123456789_" for c in middle):
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


# -- ownership: the marker every folder pretrace writes holds -----------------------------------------------------

OWNER_FILE = ".pretrace.json"
OWNER_FORMAT = 1


def _folder_files(folder: Path) -> dict[str, dict]:
    """Size and sha256 of every file below `folder` but the marker, by path relative to it."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            path = Path(root) / name
            relative = path.relative_to(folder).as_posix()
            if relative != OWNER_FILE:
                files[relative] = file_record(path)
    return dict(sorted(files.items()))


def mark_folder(folder: str | Path, command: str, manifest: bool) -> None:
    """Write the marker that says pretrace `command` wrote `folder`; `manifest=True` (a complete result) also
    records every file's size and sha256 for `verify_folder`."""
    from pretrace.version import __version__

    record = {"written_by": "pretrace", "command": command, "format": OWNER_FORMAT, "version": __version__}
    if manifest:
        record["files"] = _folder_files(Path(folder))
    write_record(Path(folder) / OWNER_FILE, record)


def folder_owner(folder: str | Path) -> dict | None:
    """The marker of a folder pretrace wrote (None when there is none); a damaged marker is `CorruptFile`."""
    path = Path(folder) / OWNER_FILE
    if not path.is_file():
        return None
    return read_record(path, f"the folder {folder} cannot be trusted; delete it and recompute it")


def verify_folder(folder: str | Path, command: str, fix: str) -> dict:
    """Refuse a result folder that `pretrace command` did not write, or whose files differ from its manifest
    (missing, truncated, edited, bit rot): each file's size and sha256 is checked. Returns the marker."""
    folder = Path(folder)
    owner = folder_owner(folder)
    if owner is None or not isinstance(owner.get("files"), dict):
        raise PretraceError(f"{folder}: not a complete `pretrace {command}` folder of this version (no {OWNER_FILE} manifest); {fix}.")
    if owner.get("command") != command or owner.get("format") != OWNER_FORMAT:
        raise PretraceError(f"{folder}: written by `pretrace {owner.get('command')}` (format {owner.get('format')}), not `pretrace {command}` "
                            f"(format {OWNER_FORMAT}); {fix}.")
    for name, record in owner["files"].items():
        verify_file(folder / name, record, fix)
    return owner


def refuse_foreign(folder: Path, command: str, flag: str) -> None:
    """Refuse a non-empty folder unless pretrace `command` (or the cache kind: 'bm25-index', ...) wrote it: pretrace
    never deletes what it did not write."""
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    try:
        owner = folder_owner(folder)
    except CorruptFile:
        owner = None
    if owner is None:
        raise PretraceError(f"{flag} {folder}: exists, is not empty and was not written by pretrace (it has no {OWNER_FILE}); "
                            f"pretrace never replaces such a folder: choose another {flag}, or empty it yourself.")
    if owner.get("command") != command:
        raise PretraceError(f"{flag} {folder}: holds {_what(owner.get('command'))}, not {_what(command)}, and is never replaced by one; "
                            f"choose another {flag}, or delete that folder yourself.")
    foreign = _unlisted(folder, owner)
    if foreign:
        raise PretraceError(f"{flag} {folder}: holds {len(foreign)} file(s) pretrace did not write ({', '.join(foreign[:3])}"
                            f"{', ...' if len(foreign) > 3 else ''}), which replacing the folder would delete; move them out, or choose another {flag}.")


CACHES = {"bm25-index": "a BM25 index", "embedding-index": "an embedding index", "trak-ensemble": "a TRAK ensemble"}


def _what(command: str | None) -> str:
    """A folder's kind in words: a cache's name, or the output of the command that wrote it."""
    return CACHES.get(str(command), f"the output of `pretrace {command}`")


def _unlisted(folder: Path, owner: dict) -> list[str]:
    """Files in a result folder that its manifest does not list (nor a later pretrace step recorded): the user's."""
    if not isinstance(owner.get("files"), dict):
        return []  # a run folder: never replaced as a whole
    known = set(owner["files"]) | set(owner.get("added", [])) | {OWNER_FILE}
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in known)


def note_added(folder: str | Path, *names: str) -> None:
    """Record files a later step wrote into a committed result folder (a pipeline's record, a report beside the
    scores), so replacing the folder knows them for pretrace's own."""
    owner = folder_owner(folder)
    if owner is not None and isinstance(owner.get("files"), dict):
        owner["added"] = sorted(set(owner.get("added", [])) | set(names))
        write_record(Path(folder) / OWNER_FILE, owner)


# -- committing result folders ------------------------------------------------------------------------------------

def _commit(tmp: Path, final: Path, discard: Iterable[Path], command: str) -> None:
    """Rename the complete `tmp` to `final`: old result aside, new one in, then old result and `discard` deleted."""
    mark_folder(tmp, command, manifest=True)
    _fsync_tree(tmp)
    trash = []
    for path in discard:  # renamed to temporary names first: a kill from here on leaves nothing a rerun would trust
        if path.exists():
            trash.append(_sibling(final, "tmp"))
            os.rename(path, trash[-1])
    old = None
    if final.exists():
        refuse_foreign(final, command, "--out")  # checked again at the last moment: the folder may have changed since
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
def atomic_directory(final: str | Path, command: str, overwrite: bool = False, discard: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `final` (see the commit protocol above), marked as
    written by pretrace `command` with its manifest, and the paths in `discard` (e.g. a checkpoint) are deleted
    with the old result; on failure it is deleted. An existing `final` is replaced only if `command` wrote it."""
    final = Path(final)
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise PretraceError(f"{final}: exists and is not a folder; choose another --out.")
    refuse_foreign(final, command, "--out")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        if final.exists() and not overwrite and any(final.iterdir()):
            raise PretraceError(f"{final}: already exists and is not empty; pass --overwrite or choose another --out.")
        _commit(tmp, final, [Path(p) for p in discard], command)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(error):
            raise no_space(final) from None
        raise


def commit_folder(folder: str | Path, final: str | Path, command: str) -> None:
    """Rename a complete work folder (e.g. a finished resumable build) to `final` by the commit protocol above."""
    _commit(Path(folder), Path(final), (), command)


class SignedParts:
    """The one resume mechanism of the long commands (fit's passes, score's batches, index's shards): a folder of
    sealed safetensors parts, each signed in its header with the run's `signature` (everything its contents depend
    on). A part whose seal fails is dropped and computed again (said in a warning), so damage never enters a result;
    a part signed for another run is refused with the fix (`run` names what may differ); parts are written atomically,
    so a kill leaves the earlier ones whole."""

    KEY = "pretrace_part"

    def __init__(self, folder: str | Path, signature: Any, run: str):
        self.folder, self.signature, self.run = Path(folder), json.loads(json.dumps(signature, default=str)), run

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.safetensors"

    def names(self, pattern: str = "*") -> list[str]:
        """The parts present whose names match `pattern`, in name order."""
        return sorted(p.name.removesuffix(".safetensors") for p in self.folder.glob(f"{pattern}.safetensors")) if self.folder.is_dir() else []

    def read(self, name: str) -> tuple[dict[str, torch.Tensor], dict]:
        """A part's tensors and the record saved with it: `CorruptFile` when a bit changed (the caller recomputes
        it), refused unless this version wrote it for a run with this signature."""
        path = self.path(name)
        tensors, metadata = read_sealed(path)
        try:
            meta = json.loads(metadata[self.KEY])
        except (KeyError, ValueError):
            raise PretraceError(f"{path}: not a checkpoint of this pretrace version; delete {self.folder} to start over.") from None
        if not isinstance(meta, dict) or meta.get("signature") != self.signature:
            raise PretraceError(f"{self.folder}: holds a checkpoint of a different {self.run}; delete that folder to start over, "
                                "or rerun with the inputs and settings it was made with.")
        meta.pop("signature")
        return tensors, meta

    def load(self, name: str, recompute: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """A part's tensors and record; None when absent, or damaged (then deleted, and `recompute` says what follows)."""
        if not self.path(name).is_file():
            return None
        try:
            return self.read(name)
        except CorruptFile as error:
            warnings.warn(f"{error}; {recompute}.", stacklevel=3)
            self.path(name).unlink()
            return None

    def save(self, name: str, tensors: dict[str, torch.Tensor], **record: Any) -> Path:
        """Write one part, sealed and signed, with `record` (JSON) in its header."""
        path = self.path(name)
        write_tensors(path, tensors, metadata={self.KEY: json.dumps({"signature": self.signature, **record})}, seal=True)
        return path


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


def resolve_path(path: str | Path, flag: str) -> Path:
    """`path` with every symbolic link resolved; a link loop or a link to nothing is refused, naming the flag."""
    path = Path(path)
    try:
        resolved = path.resolve(strict=False)
        if path.is_symlink() and not path.exists():
            raise PretraceError(f"{flag} {path}: is a symbolic link to {os.readlink(path)}, which does not exist; "
                                f"pass an existing path or remove the link.")
    except (RuntimeError, OSError) as exc:  # a link loop: RuntimeError before Python 3.13, OSError (ELOOP) after
        if isinstance(exc, OSError) and exc.errno not in (errno.ELOOP, None):
            raise PretraceError(f"{flag} {path}: cannot be resolved ({exc.strerror}).") from None
        raise PretraceError(f"{flag} {path}: is a loop of symbolic links; pass a real path.") from None
    return resolved


def check_output(out: str | Path, inputs: dict[str, str | Path | None] | None = None, flag: str = "--out") -> Path:
    """Refuse an output folder that is a file or a link, an input folder or inside one, or that holds an input;
    return it resolved. `inputs` maps flags to the paths they name (every file and folder the run reads)."""
    out = Path(out)
    if out.is_symlink():
        resolve_path(out, flag)  # a dangling link or a loop: said as such
        raise PretraceError(f"{flag} {out}: is a symbolic link (to {os.readlink(out)}); pass the real folder, or another {flag}: "
                            "pretrace replaces its output folder as a whole, which would replace the link, not its target.")
    resolved = resolve_path(out, flag)
    if resolved.exists() and not resolved.is_dir():
        raise PretraceError(f"{flag} {out}: exists and is not a folder; choose another {flag}.")
    blocking = next((parent for parent in resolved.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise PretraceError(f"{flag} {out}: {blocking} is a file, so no folder can be made inside it; choose another {flag}.")
    if out.name in ("", "..") or resolved.parent == resolved:
        raise PretraceError(f"{flag} {out}: name the output folder itself (e.g. ./factors), not '.', '..' or a root; it is replaced as a whole.")
    for name, given in (inputs or {}).items():
        if given is None:
            continue
        source = resolve_path(given, name)
        if source.is_dir() and _within(resolved, source):
            where = "is" if resolved == source else "is inside"
            raise PretraceError(f"{flag} {out} {where} the input folder {name} {given}; choose an {flag} outside the inputs.")
        if _within(source, resolved):
            raise PretraceError(f"{flag} {out} contains the input {name} {given}, which writing the result would replace; choose another {flag}.")
    return resolved


def _check_writable(out: Path, flag: str) -> None:
    """Create the parent and a scratch file in it now, not after the work: a read-only --out fails here."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        descriptor, scratch = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(descriptor)
        Path(scratch).unlink(missing_ok=True)
    except OSError as exc:
        if disk_full(exc):
            raise no_space(out.parent) from None
        raise PretraceError(f"{flag} {out}: cannot write in {out.parent} ({exc.strerror}); choose a writable {flag}.") from None


def check_cache(folder: str | Path, command: str, flag: str, inputs: dict[str, str | Path | None], outputs: dict[str, str | Path]) -> Path:
    """A folder a run both reads and writes (a TRAK ensemble, a retrieval index): refused when it is, holds or lies
    in an input or an output of the run, or is a non-empty folder another command (or no pretrace) wrote."""
    resolved = check_output(folder, inputs, flag)
    for name, other in outputs.items():
        other = resolve_path(other, name)
        if _within(resolved, other) or _within(other, resolved):
            raise PretraceError(f"{flag} {folder} overlaps the output {name} {other}; choose a {flag} outside it.")
    refuse_foreign(Path(folder), command, flag)
    _check_writable(Path(folder), flag)
    return resolved


@contextmanager
def output_folder(out: str | Path, overwrite: bool, inputs: dict[str, str | Path | None] | None = None, *, command: str,
                  lock: bool = True, resume: bool = False) -> Iterator[Path]:
    """Every command's first step for its --out, before loading anything: refuse unsafe outputs (see
    `check_output`), check it is writable, lock it for the whole command, recover a killed run's commit, refuse a
    non-empty folder that `pretrace command` did not write, and one it did without `overwrite`. `inputs` maps flags
    to the paths they name.

    `lock=False` on the ranks of a distributed job other than the writer: they validate only. `resume=True` for
    run folders whose cached stages a rerun reuses in place (trace, demo, bench): such a folder is marked as
    `command`'s when it is created, and a rerun continues it."""
    out = Path(out)
    check_output(out, inputs)
    _check_writable(out, "--out")
    if not lock:
        yield out
        return
    with _exclusive_lock(out):
        recover_output(out)
        refuse_foreign(out, command, "--out")
        if out.is_dir() and any(out.iterdir()) and not (overwrite or resume):
            raise PretraceError(f"{out}: already exists and is not empty; pass --overwrite or choose another --out.")
        created = resume and folder_owner(out) is None
        if created:
            out.mkdir(parents=True, exist_ok=True)
            mark_folder(out, command, manifest=False)
        try:
            yield out
        except BaseException:
            if created and [p.name for p in out.iterdir()] == [OWNER_FILE]:  # refused before writing anything: leave nothing
                shutil.rmtree(out, ignore_errors=True)
            raise


def read_jsonl_rows(path: str | Path) -> list[dict]:
    """Rows of a JSONL file this library wrote."""
    with Path(path).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
