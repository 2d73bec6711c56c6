"""Save and load adapters in standard PEFT format, atomically.

A saved adapter is a folder with ``adapter_config.json`` and ``adapter_model.safetensors``,
exactly what ``PeftModel.save_pretrained`` writes, so ``PeftModel.from_pretrained`` and
``load_adapter`` read it too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from fedpref.protocol.atomic import recover_dir, replace_dir_atomic
from fedpref.protocol.errors import DataError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def save_adapter(model: torch.nn.Module, adapter: str, path: str | os.PathLike[str], *, metadata: dict[str, str] | None = None) -> None:
    """Write ``adapter`` of a PEFT model to ``path`` (replaced atomically)."""
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items()}
    config = model.peft_config[adapter]

    def fill(tmp: Path) -> None:
        config.save_pretrained(str(tmp))
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", **(metadata or {})})

    replace_dir_atomic(path, fill)


def adapter_exists(path: str | os.PathLike[str]) -> bool:
    recover_dir(path)
    return (Path(path) / WEIGHTS_NAME).is_file()


def load_adapter_weights(model: torch.nn.Module, adapter: str, path: str | os.PathLike[str]) -> None:
    """Load weights saved by :func:`save_adapter` (or PEFT itself) into ``adapter``."""
    path = Path(path)
    recover_dir(path)
    weights = path / WEIGHTS_NAME
    try:
        state = load_file(str(weights))
        json.loads((path / CONFIG_NAME).read_text())
    except FileNotFoundError as e:
        raise DataError(f"{e.filename}: adapter file missing; the adapter folder is incomplete") from None
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise DataError(f"{weights}: cannot read the adapter ({e}); delete the folder to start the adapter afresh") from None
    result = set_peft_model_state_dict(model, state, adapter_name=adapter)
    unexpected = [k for k in result.unexpected_keys if f".{adapter}." in k or "lora" in k]
    if unexpected:
        raise DataError(f"{weights}: unexpected tensors {unexpected[:3]}; the adapter was saved for another model")
