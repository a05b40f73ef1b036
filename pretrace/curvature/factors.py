"""EK-FAC factors of one model: per module the Kronecker covariances, their eigenbases and corrected eigenvalues.

On disk a factor folder holds `factors.safetensors` with tensors named `<module>.<kind>` and
`factors.json` with the settings, counts, the model's fingerprint and the fitting data's hash. Per-head
blocks give the gradient tensors and Λ a leading block dimension.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from pretrace.errors import PretraceError
from pretrace.modeling.modules import TrackedModule
from pretrace.storage import read_json, read_tensors, write_json, write_tensors

FACTORS_FILE = "factors.safetensors"
METADATA_FILE = "factors.json"
FORMAT_VERSION = 1


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


@dataclass
class Factors:
    modules: dict[str, ModuleFactors]
    metadata: dict = field(default_factory=dict)

    def module_names(self) -> list[str]:
        return list(self.modules)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
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
        folder = Path(folder)
        if not folder.is_dir():
            raise PretraceError(f"{folder}: no such factor folder; create it with `pretrace fit`.")
        meta = read_json(folder / METADATA_FILE)
        if meta.get("format_version") != FORMAT_VERSION or "modules" not in meta:
            raise PretraceError(f"{folder}: not a pretrace factor folder (format {meta.get('format_version')!r}); re-run `pretrace fit`.")
        tensors = read_tensors(folder / FACTORS_FILE)
        modules = {}
        for name, info in meta["modules"].items():
            values = {}
            for attr, disk in _DISK_NAMES.items():
                key = f"{name}.{disk}"
                if key not in tensors:
                    if attr == "diagonal":
                        values[attr] = None
                        continue
                    raise PretraceError(f"{folder}: tensor {key!r} is missing; the factor folder is incomplete, re-run `pretrace fit`.")
                value = tensors[key]
                if attr in _BLOCKED and info["n_blocks"] == 1:
                    value = value.unsqueeze(0)
                if not torch.isfinite(value).all():
                    raise PretraceError(f"{folder}: tensor {key!r} holds NaN or infinite values; the fit diverged, re-fit in float32/float64.")
                values[attr] = value
            modules[name] = ModuleFactors(**values)
        return cls(modules, meta)

    def check_matches(self, tracked: list[TrackedModule], fingerprint: str | None = None, where: str = "factors") -> None:
        """Refuse factors fitted on another model or over differently shaped modules."""
        if fingerprint is not None and self.metadata.get("model_fingerprint") not in (None, fingerprint):
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
