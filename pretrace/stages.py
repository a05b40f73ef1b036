"""One stage cache for every multi-stage job (trace, the benchmarks, the demo).

A run folder's `stages.json` records, per stage, a digest of everything the stage read: the contents of
its input files, a stamp of its input folders, its settings and the digests of the stages upstream of it.
A stage is reused only when that digest is unchanged and its outputs exist, so a changed input or setting
recomputes that stage and, through the upstream digests, everything downstream of it — never a stale
result relabelled with new settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pretrace.config import to_dict
from pretrace.data.records import check_source, source_sha256
from pretrace.errors import CorruptFile, PretraceError
from pretrace.storage import file_sha256, read_record, write_record

STAGES_FILE = "stages.json"


@dataclass(frozen=True)
class File:
    """An input file, keyed by the sha256 of its contents."""

    path: str | Path


@dataclass(frozen=True)
class Source:
    """A record source (a file, a `datasets` folder, a hub dataset name), keyed by its contents' sha256."""

    path: str | Path


@dataclass(frozen=True)
class Folder:
    """An input folder (a model, factors), keyed by its files' names, sizes and modification times: cheap,
    and it changes whenever the folder is rewritten (pretrace writes folders by renaming a new one in)."""

    path: str | Path
    exclude: tuple[str, ...] = ()  # file names left out of the stamp (records written beside the contents)


@dataclass(frozen=True)
class StageKey:
    """A stage's name, its normalised inputs and their digest; pass a key as an input of a downstream stage."""

    name: str
    inputs: dict
    digest: str


def folder_stamp(folder: str | Path, exclude: tuple[str, ...] = ()) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise PretraceError(f"{folder}: no such folder.")
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(folder.iterdir()) if p.is_file() and p.name not in exclude}


def _normalise(value: Any) -> Any:
    """Inputs as plain JSON: files by content hash, folders by stamp, upstream stages by digest."""
    if isinstance(value, StageKey):
        return {"stage": value.name, "digest": value.digest}
    if isinstance(value, Folder):
        return {"folder": folder_stamp(value.path, value.exclude)}
    if isinstance(value, Source):
        check_source(value.path)
        return {"source_sha256": source_sha256(value.path)}
    if isinstance(value, File):
        if not Path(value.path).is_file():
            raise PretraceError(f"{value.path}: no such file.")
        return {"sha256": file_sha256(value.path)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _normalise(to_dict(value))  # settings with their groups, a method config with its name
    if isinstance(value, dict):
        return {str(k): _normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"stage input of type {type(value).__name__} has no stable digest")


def _sha256(normalised: dict) -> str:
    return hashlib.sha256(json.dumps(normalised, sort_keys=True).encode()).hexdigest()


def digest(**inputs: Any) -> str:
    """A stable sha256 of `inputs` (files by content, folders by stamp, stages by digest, settings as JSON)."""
    return _sha256(_normalise(inputs))


def content_digest(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names and their sha256s): what a stage wrote."""
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\0".encode())
    return digest.hexdigest()


class StageCache:
    """The stages of one run folder: which were reused and which computed in this run (`statuses`).

    `stages.json` is sealed, and records the digest of every output a finished stage wrote: a stage is reused only
    when its outputs still match (a damaged or edited output is said, and the stage computed again)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / STAGES_FILE
        self._recorded: dict = {}
        self._outputs: dict[str, tuple[Path, ...]] = {}
        self.statuses: dict[str, str] = {}
        if self.path.is_file():
            try:
                self._recorded = read_record(self.path, "its stages are computed again")
            except CorruptFile as error:
                warnings.warn(f"{error}: every stage of {self.folder} is computed again.", stacklevel=2)

    def key(self, name: str, **inputs: Any) -> StageKey:
        normalised = _normalise(inputs)  # once: it hashes every input file
        return StageKey(name, normalised, _sha256(normalised))

    def _intact(self, name: str, recorded: dict, outputs: tuple[Path, ...]) -> bool:
        """Whether a finished stage's outputs exist and match the digests recorded when it finished."""
        written = recorded.get("outputs")
        if not all(p.exists() for p in outputs) or not isinstance(written, dict):
            return False
        for output in outputs:
            if written.get(self._name(output)) != content_digest(output):
                warnings.warn(f"{output}: stage {name!r} wrote other contents than it holds now (modified or corrupted on disk); "
                              "the stage is computed again.", stacklevel=3)
                return False
        return True

    def _name(self, output: Path) -> str:
        return Path(output).resolve().relative_to(self.folder.resolve()).as_posix() if Path(output).resolve().is_relative_to(self.folder.resolve()) else str(output)

    def stale(self, key: StageKey, *outputs: Path) -> bool:
        """True when the stage must be computed: its inputs changed, it never finished, or an output is missing or
        no longer what it wrote.

        Outputs of other inputs (inside the run folder) are removed first, so nothing of an older run is mixed
        in; those of an unfinished run with the same inputs are kept, for a stage that resumes on its own."""
        outputs = tuple(Path(p) for p in outputs)
        recorded = self._recorded.get(key.name, {})
        same = recorded.get("digest") == key.digest
        self._outputs[key.name] = outputs
        if same and recorded.get("done") and self._intact(key.name, recorded, outputs):
            self.statuses[key.name] = "reused"
            return False
        self.statuses[key.name] = "computed"
        if not (same and not recorded.get("done")):
            root = self.folder.resolve()
            for output in outputs:
                if not output.resolve().is_relative_to(root):
                    raise PretraceError(f"{output}: a stage output outside its run folder {self.folder}; refusing to remove it.")
                if output.is_dir():
                    shutil.rmtree(output)
                elif output.exists():
                    output.unlink()
        self._recorded[key.name] = {"digest": key.digest, "inputs": key.inputs, "done": False}
        write_record(self.path, self._recorded)
        return True

    def record(self, key: StageKey) -> None:
        """Mark the stage finished with these inputs (after its outputs are written), with its outputs' digests."""
        written = {self._name(p): content_digest(p) for p in self._outputs.get(key.name, ()) if p.exists()}
        self._recorded[key.name] = {"digest": key.digest, "inputs": key.inputs, "done": True, "outputs": written}
        write_record(self.path, self._recorded)
