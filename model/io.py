"""Save and load adapters in standard PEFT format, atomically, as a folder or in memory.

A saved adapter is a folder with ``adapter_config.json`` and ``adapter_model.safetensors``,
exactly what ``PeftModel.save_pretrained`` writes, so ``PeftModel.from_pretrained`` and
``load_adapter`` read it too. :func:`adapter_files` and :func:`load_adapter_files` are the one
implementation of that format, on bytes (the device agent seals them without ever writing
the private adapter to disk in clear); :func:`save_adapter` and :func:`load_adapter_weights`
are the same on a folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedpref.common.atomic import recover_dir, replace_dir_atomic
from fedpref.common.errors import DataError
from fedpref.model.preference import reward_model

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME)
_FOLDER_FIX = "delete the folder to start the adapter afresh"


def adapter_files(model: torch.nn.Module, adapter: str, *, metadata: dict[str, str] | None = None) -> dict[str, bytes]:
    """``adapter`` of a PEFT model as the files of its PEFT folder: {file name: content}.

    The config is what ``PeftConfig.save_pretrained`` writes (with sets as sorted lists)."""
    weights = get_peft_model_state_dict(model, adapter_name=adapter)
    state = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    config = model.peft_config[adapter].to_dict()
    config = {k: sorted(v, key=str) if isinstance(v, (set, frozenset)) else v for k, v in config.items()}
    return {
        CONFIG_NAME: json.dumps(config, indent=2, sort_keys=True).encode("utf-8"),
        WEIGHTS_NAME: save_safetensors(state, metadata={"format": "pt", **(metadata or {})}),
    }


def load_adapter_files(model: torch.nn.Module, adapter: str, files: Mapping[str, bytes], *,
                       where: str | os.PathLike[str], fix: str = _FOLDER_FIX) -> None:
    """Load the files of a PEFT adapter folder (:func:`adapter_files`) into ``adapter``;
    ``where`` names their origin and ``fix`` the remedy in errors."""
    missing = [name for name in ADAPTER_FILES if name not in files]
    if missing:
        raise DataError(f"{Path(where) / missing[0]}: adapter file missing; the adapter is incomplete; {fix}")
    try:
        state = load_safetensors(bytes(files[WEIGHTS_NAME]))
        json.loads(files[CONFIG_NAME])
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise DataError(f"{Path(where) / WEIGHTS_NAME}: cannot read the adapter ({e}); {fix}") from None
    result = set_peft_model_state_dict(model, state, adapter_name=adapter)
    unexpected = [k for k in result.unexpected_keys if f".{adapter}." in k or "lora" in k]
    if unexpected:
        raise DataError(f"{Path(where) / WEIGHTS_NAME}: unexpected tensors {unexpected[:3]}; "
                        "the adapter was saved for another model")
    reset_frozen_lora(model, adapter)


@torch.no_grad()
def reset_frozen_lora(model: torch.nn.Module, adapter: str) -> list[str]:
    """With ``adapter.private_lora = false`` the private LoRA must stay at its zero start: an
    adapter saved while it trained (the setting was true) would otherwise bring it back, frozen
    but still changing the features the shared score reads. Its ``lora_B`` is zeroed (the LoRA
    then adds nothing); returns the tensors that were not zero."""
    if getattr(reward_model(model), "private_lora", True):
        return []
    reset = []
    for name, p in model.named_parameters():
        if f".lora_B.{adapter}." in name and not p.requires_grad and bool(p.any()):
            p.zero_()
            reset.append(name)
    if reset:
        import logging

        logging.getLogger("fedpref.model").warning(
            "the saved %s adapter has a trained LoRA, but adapter.private_lora = false: its %d lora_B tensor(s) are "
            "reset to zero (the personal head is kept)", adapter, len(reset))
    return reset


def save_adapter(model: torch.nn.Module, adapter: str, path: str | os.PathLike[str], *, metadata: dict[str, str] | None = None) -> None:
    """Write ``adapter`` of a PEFT model to the folder ``path`` (replaced atomically)."""
    files = adapter_files(model, adapter, metadata=metadata)

    def fill(tmp: Path) -> None:
        for name, data in files.items():
            (tmp / name).write_bytes(data)

    replace_dir_atomic(path, fill)


def adapter_exists(path: str | os.PathLike[str]) -> bool:
    recover_dir(path)
    return (Path(path) / WEIGHTS_NAME).is_file()


def load_adapter_weights(model: torch.nn.Module, adapter: str, path: str | os.PathLike[str]) -> None:
    """Load weights saved by :func:`save_adapter` (or PEFT itself) into ``adapter``."""
    path = Path(path)
    recover_dir(path)
    files = {}
    for name in ADAPTER_FILES:
        try:
            files[name] = (path / name).read_bytes()
        except FileNotFoundError as e:
            raise DataError(f"{e.filename}: adapter file missing; the adapter folder is incomplete") from None
    load_adapter_files(model, adapter, files, where=path)
