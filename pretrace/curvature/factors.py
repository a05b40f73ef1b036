"""EK-FAC factors of one model: per module the Kronecker covariances, their eigenbases and corrected eigenvalues.

On disk a factor folder holds `factors.safetensors` with tensors named `<module>.<kind>` and
`factors.json` with the settings, counts, the model's fingerprint and the fitting data's hash. Per-head
blocks give the gradient tensors and Λ a leading block dimension.
"""

from __future__ import annotations

import hashlib
import json

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from pretrace.config import IN_MEMORY, require_path
from pretrace.errors import PretraceError
from pretrace.modeling.modules import TrackedModule
from pretrace.storage import atomic_directory, folder_owner, read_json_object, read_tensors, verify_folder, write_json, write_tensors

FACTORS_FILE = "factors.safetensors"
METADATA_FILE = "factors.json"
FORMAT_VERSION = 3  # 3: the folder's .pretrace.json manifest holds every file's sha256 (older folders are refused: recompute them)
_RECOMPUTE = "recompute the factors with `pretrace fit`"


@dataclass
class ModuleFactors:
    """A: [d_in', d_in'], G: [nb, bs, bs], Λ: [nb, bs, d_in'] (bias column last). Block dim dropped on disk when nb == 1."""

    activation_covariance: torch.Tensor
    gradient_covariance: torch.Tensor
    activation_eigenvectors: torch.Tensor
    gradient_eigenvectors: torch.Tensor
    activation_eigenvalues: torch.Tensor
    gradient_eigenvalues: torch.Tensor
    lambda_: torch.Tensor
    diagonal: torch.Tensor | None = None  # [d_out, d_in'] mean squared per-document gradient

    @property
    def n_blocks(self) -> int:
        return self.gradient_covariance.shape[0]

    def to(self, device=None, dtype=None) -> "ModuleFactors":
        def move(t):
            return None if t is None else t.to(device=device, dtype=dtype)

        return ModuleFactors(*(move(getattr(self, f)) for f in self.__dataclass_fields__))


_DISK_NAMES = {
    "activation_covariance": "activation_covariance",
    "gradient_covariance": "gradient_covariance",
    "activation_eigenvectors": "activation_eigenvectors",
    "gradient_eigenvectors": "gradient_eigenvectors",
    "activation_eigenvalues": "activation_eigenvalues",
    "gradient_eigenvalues": "gradient_eigenvalues",
    "lambda_": "lambda",
    "diagonal": "diagonal",
}
_BLOCKED = {"gradient_covariance", "gradient_eigenvectors", "gradient_eigenvalues", "lambda_"}


def _module_shapes(folder: Path, meta: dict) -> dict[str, tuple[int, int, int]]:
    """Per module (blocks, block size, inputs) from factors.json, refusing a malformed `modules` entry."""
    modules = meta.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise PretraceError(f"{folder / METADATA_FILE}: 'modules' is missing or not an object of modules; {_RECOMPUTE}.")
    shapes = {}
    for name, info in modules.items():
        n_blocks = info.get("n_blocks") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        valid = [n_blocks, *shape] if isinstance(shape, list) and len(shape) == 2 else []
        if not valid or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in valid):
            raise PretraceError(f"{folder / METADATA_FILE}: module {name!r} needs a positive integer 'n_blocks' and 'shape' "
                                f"[block size, inputs]; {_RECOMPUTE}.")
        shapes[name] = tuple(valid)
    return shapes


def _disk_shapes(n_blocks: int, block_size: int, d_in: int) -> dict[str, tuple[int, ...]]:
    """The stored shape of each tensor of a module (the block dimension dropped when there is one block)."""
    blocks = (n_blocks,) if n_blocks > 1 else ()
    return {
        "activation_covariance": (d_in, d_in), "activation_eigenvectors": (d_in, d_in), "activation_eigenvalues": (d_in,),
        "gradient_covariance": (*blocks, block_size, block_size), "gradient_eigenvectors": (*blocks, block_size, block_size),
        "gradient_eigenvalues": (*blocks, block_size), "lambda_": (*blocks, block_size, d_in), "diagonal": (n_blocks * block_size, d_in),
    }


def factors_metadata(folder: str | Path) -> dict:
    """`factors.json` of a factor folder, refused unless `pretrace fit` wrote the folder: what a run checks before any
    work (the model it was fitted on, its settings); the tensors are verified when `Factors.load` reads them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PretraceError(f"{folder}: no such factor folder; create it with `pretrace fit`.")
    owner = folder_owner(folder)
    if owner is None or owner.get("command") != "fit":
        written = "not written by pretrace" if owner is None else f"written by `pretrace {owner.get('command')}`"
        raise PretraceError(f"{folder}: not a factor folder ({written}); pass a folder made by `pretrace fit`.")
    return read_json_object(folder / METADATA_FILE, _RECOMPUTE)


@dataclass
class Factors:
    modules: dict[str, ModuleFactors]
    metadata: dict = field(default_factory=dict)

    def module_names(self) -> list[str]:
        return list(self.modules)

    def content_digest(self) -> str:
        """sha256 over every tensor (name, dtype, shape, bytes) and the metadata: what identifies factors held in memory
        (a resumed scoring pass must use the same ones)."""
        digest = hashlib.sha256(json.dumps(self.metadata, sort_keys=True, default=str).encode())
        for name, mf in self.modules.items():
            for attr in _DISK_NAMES:
                value = getattr(mf, attr)
                if value is not None:
                    value = value.detach().to("cpu").contiguous()
                    digest.update(f"{name}.{attr}:{value.dtype}:{tuple(value.shape)}".encode())
                    digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def save(self, folder: str | Path, overwrite: bool = False, discard: Iterable[str | Path] = ()) -> None:
        """`factors.safetensors` and `factors.json` (every module's shape), committed as one folder with its manifest
        of sha256s (see `pretrace.storage`): `folder` holds the old factors or the new, never a mix. `discard` (a fit's
        checkpoint) is deleted in the same commit."""
        with atomic_directory(folder, "fit", overwrite=overwrite, discard=discard) as tmp:
            self._write(tmp)

    def _write(self, folder: Path) -> None:
        tensors = {}
        for name, mf in self.modules.items():
            for attr, disk in _DISK_NAMES.items():
                value = getattr(mf, attr)
                if value is None:
                    continue
                if attr in _BLOCKED and mf.n_blocks == 1:
                    value = value[0]
                tensors[f"{name}.{disk}"] = value
        write_tensors(folder / FACTORS_FILE, tensors)
        meta = dict(self.metadata)
        meta["format_version"] = FORMAT_VERSION
        meta["modules"] = {name: {"n_blocks": mf.n_blocks, "shape": list(mf.lambda_.shape[1:])} for name, mf in self.modules.items()}
        write_json(folder / METADATA_FILE, meta)

    @classmethod
    def load(cls, folder: str | Path) -> "Factors":
        """Factors verified against their folder's manifest: content hash, shapes, finite values, Λ ≥ 0."""
        folder = Path(require_path("folder", folder))
        if not folder.is_dir():
            raise PretraceError(f"{folder}: no such factor folder; create it with `pretrace fit`.")
        verify_folder(folder, "fit", _RECOMPUTE)
        meta = read_json_object(folder / METADATA_FILE, _RECOMPUTE)
        if meta.get("format_version") != FORMAT_VERSION:
            raise PretraceError(f"{folder / METADATA_FILE}: not a factor folder of this pretrace version (format {meta.get('format_version')!r}, "
                                f"expected {FORMAT_VERSION}); {_RECOMPUTE}.")
        shapes = _module_shapes(folder, meta)
        tensors = read_tensors(folder / FACTORS_FILE)
        modules = {}
        for name, (n_blocks, block_size, d_in) in shapes.items():
            expected = _disk_shapes(n_blocks, block_size, d_in)
            values = {}
            for attr, disk in _DISK_NAMES.items():
                key = f"{name}.{disk}"
                if key not in tensors:
                    if attr == "diagonal":
                        values[attr] = None
                        continue
                    raise PretraceError(f"{folder}: tensor {key!r} is missing; the factor folder is incomplete, {_RECOMPUTE}.")
                value = tensors[key]
                if not value.is_floating_point():
                    raise PretraceError(f"{folder}: tensor {key!r} is {value.dtype}, not floating point; {_RECOMPUTE}.")
                if tuple(value.shape) != expected[attr]:
                    raise PretraceError(f"{folder}: tensor {key!r} has shape {tuple(value.shape)}, but factors.json's module shape "
                                        f"needs {expected[attr]}; {_RECOMPUTE}.")
                if not torch.isfinite(value).all():
                    raise PretraceError(f"{folder}: tensor {key!r} holds NaN or infinite values; {_RECOMPUTE} (with --factor-dtype float32 or float64).")
                if attr == "lambda_" and bool((value < 0).any()):
                    raise PretraceError(f"{folder}: tensor {key!r} has negative eigenvalues (Λ is a mean of squares); {_RECOMPUTE}.")
                if attr in _BLOCKED and n_blocks == 1:
                    value = value.unsqueeze(0)
                values[attr] = value
            modules[name] = ModuleFactors(**values)
        return cls(modules, meta)

    def check_matches(self, tracked: list[TrackedModule], fingerprint: str | None = None, where: str = "factors") -> None:
        """Refuse factors fitted on another model or over differently shaped modules."""
        if fingerprint is not None and not isinstance(self.metadata.get("model_fingerprint"), str):
            raise PretraceError(f"{where} record no model fingerprint, so they cannot be matched to this model; {_RECOMPUTE} for it.")
        if fingerprint is not None and self.metadata["model_fingerprint"] != fingerprint:
            raise PretraceError(
                f"{where} were fitted on a different model (fingerprint {self.metadata.get('model_fingerprint', '?')[:12]} "
                f"vs {fingerprint[:12]}); fit factors for this model with `pretrace fit`."
            )
        for t in tracked:
            mf = self.modules.get(t.name)
            if mf is None:
                raise PretraceError(f"{where} have no module {t.name!r}; fit them with the same module selection (--modules/--preset).")
            expected = (t.n_blocks, t.block_size, t.d_in_total)
            if tuple(mf.lambda_.shape) != expected:
                raise PretraceError(
                    f"{where}: module {t.name!r} has shape {tuple(mf.lambda_.shape)} but the model needs {expected} "
                    "(blocks, block size, inputs); re-fit with the same --attention-blocks and model."
                )

    def mean_lambda(self, name: str) -> float:
        return float(self.modules[name].lambda_.double().mean())


def check_factor_source(flag: str, source: "str | Path | Factors | None", model_flag: str, stage, needs_diagonal: bool = False) -> None:
    """Refuse, before any work, a factor folder that is not one, factors fitted on another model than the `stage`
    they are given with (saying whether only the --dtype differs: the fingerprint is over the weights as loaded)
    or lacking the diagonal `needs_diagonal` asks for."""
    if source is None:
        return
    meta, folder = (source.metadata, IN_MEMORY) if isinstance(source, Factors) else (factors_metadata(source), source)
    recorded = meta.get("model_fingerprint")
    if isinstance(recorded, str) and recorded != stage.fingerprint:
        fitted_dtype = (meta.get("options") or {}).get("dtype")
        if fitted_dtype is not None and fitted_dtype != stage.options.dtype:
            raise PretraceError(f"{flag} {folder} were fitted with --dtype {fitted_dtype}, and {model_flag} {stage.path} loaded as {stage.options.dtype} "
                                f"has other weights; pass --dtype {fitted_dtype}, or refit the factors with --dtype {stage.options.dtype}.")
        raise PretraceError(f"{flag} {folder} were fitted on a different model than {model_flag} {stage.path}; pass the factors fitted on that model "
                            f"(`pretrace fit --model {stage.path}`){' (are --pretrained-factors and --finetuned-factors swapped?)' if flag != '--factors' else ''}.")
    if needs_diagonal and not (meta.get("settings") or {}).get("diagonal"):
        raise PretraceError(f"--method diagonal needs factors fitted with --diagonal, and {flag} {folder} were not; "
                            f"refit them with `pretrace fit --diagonal`, or choose --method ekfac.")
