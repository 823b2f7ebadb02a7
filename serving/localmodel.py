"""Weights as the local engine holds them: loading HF models and peft adapters, and policies.

A `Weights` is one transformers model in memory, optionally wrapped by peft once a LoRA
adapter has been added to it (adapters share the model's base tensors). A `Policy` is what a
request is pinned to: a version, the `Weights` it runs on, and which adapter (if any) must be
active while its batch runs — ``None`` on a peft-wrapped model means "adapters disabled",
i.e. the base weights. Loading reads files and builds tensors; it never touches a model that
is serving (that is the scheduler's job, between steps).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.errors import ServingError
from serving.engine import WeightsKind


class Weights:
    def __init__(self, model: Any) -> None:
        self.model = model
        self.peft: Any = None  # PeftModel around `model`, once an adapter was added

    def forward(self, **kwargs: Any) -> Any:
        return (self.peft if self.peft is not None else self.model)(**kwargs)

    def add_adapter(self, name: str, config: Any, tensors: dict[str, Any]) -> None:
        """Inject adapter `name` and load its tensors. Call only between forward passes."""
        from peft import PeftModel, set_peft_model_state_dict

        config.inference_mode = True
        if self.peft is None:
            self.peft = PeftModel(self.model, config, adapter_name=name)
        else:
            self.peft.add_adapter(name, config)
        result = set_peft_model_state_dict(self.peft, tensors, adapter_name=name)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
        if unexpected:
            self.peft.delete_adapter(name)
            raise ServingError(f"adapter {name} does not fit the model: unexpected {unexpected[:3]}")
        self.peft.eval()

    def delete_adapter(self, name: str) -> None:
        if self.peft is None or name not in self.peft.peft_config:
            return
        if len(self.peft.peft_config) == 1:
            # peft keeps a dangling active adapter after deleting the last one: take the LoRA
            # layers out instead, giving back the plain model.
            self.model = self.peft.unload()
            self.peft = None
            return
        if self.peft.active_adapter == name:
            self.peft.set_adapter(next(n for n in self.peft.peft_config if n != name))
        self.peft.delete_adapter(name)

    @property
    def adapters(self) -> list[str]:
        return [] if self.peft is None else list(self.peft.peft_config)


@dataclass(eq=False)
class Policy:
    version: int
    weights: Weights
    adapter: str | None
    kind: WeightsKind
    active: int = 0  # requests pinned to this policy and not finished

    def activated(self):
        """Context in which `weights.forward` computes this policy."""
        peft = self.weights.peft
        if peft is None:
            return nullcontext()
        if self.adapter is None:
            return peft.disable_adapter()
        if peft.active_adapter != self.adapter:
            peft.set_adapter(self.adapter)
        return nullcontext()


def load_hf_model(path: Path, device: Any, dtype: Any, with_tokenizer: bool = True):
    """(tokenizer or None, model in eval mode on `device`) from a Hugging Face directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ServingError(f"{path} is not a Hugging Face model directory (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path) if with_tokenizer else None
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    except Exception as exc:
        raise ServingError(f"cannot load model from {path}: {exc}") from exc
    return tokenizer, model


def load_adapter_files(path: Path, device: Any) -> tuple[Any, dict[str, Any]]:
    """(peft config, adapter tensors) read from a peft adapter directory."""
    from peft import PeftConfig
    from peft.utils import load_peft_weights

    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise ServingError(f"{path} is not a peft adapter directory (no adapter_config.json)")
    try:
        config = PeftConfig.from_pretrained(str(path))
        tensors = load_peft_weights(str(path), device=str(device))
    except Exception as exc:
        raise ServingError(f"cannot read adapter from {path}: {exc}") from exc
    return config, tensors


def max_context(config: Any) -> int:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ServingError(f"cannot tell the context length of {type(config).__name__}")
