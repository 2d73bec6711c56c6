"""The parameter partition: every parameter name maps to exactly one group.

This is the only place that decides which parameters are trained, which leave the device,
and which must stay bit-identical. Everything else calls :func:`group_of`.

| group      | contents                                   | trained? | leaves the device?     |
|------------|--------------------------------------------|----------|------------------------|
| BACKBONE   | pretrained encoder/decoder, frozen bases   | never    | never (sha256 only)    |
| SAFETY     | the safety module of the signed policy     | never    | never (digest only)    |
| SHARED     | shared LoRA adapter and shared reward head | DP-SGD   | only as a clipped delta|
| PRIVATE    | the user's LoRA adapter and personal head  | DP-SGD   | never                  |
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from enum import Enum

SHARED_ADAPTER = "shared"
PRIVATE_ADAPTER = "private"
SAFETY_MODULE = "safety_module"


class Group(str, Enum):
    BACKBONE = "backbone"
    SAFETY = "safety"
    SHARED = "shared"
    PRIVATE = "private"


# PEFT names adapter weights `...<kind>.<adapter>.<param>`, e.g.
# `encoder.layer.5.attention.self.query.lora_A.shared.weight` or
# `score.modules_to_save.shared.weight`.
_ADAPTER_RE = re.compile(
    r"(?:^|\.)(?:lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|modules_to_save)"
    r"\.(?P<adapter>[A-Za-z0-9_]+)(?:\.|$)"
)
_SAFETY_RE = re.compile(rf"(?:^|\.){SAFETY_MODULE}(?:\.|$)")


def group_of(name: str) -> Group:
    """The group of a parameter, from its fully qualified name.

    Safety wins over everything (a LoRA can never be attached to the safety module
    without its parameters still counting as safety); unknown adapter names are an error,
    because a parameter that silently fell into ``backbone`` would never be checked.
    """
    if _SAFETY_RE.search(name):
        return Group.SAFETY
    m = _ADAPTER_RE.search(name)
    if m is None:
        return Group.BACKBONE
    adapter = m.group("adapter")
    if adapter == SHARED_ADAPTER:
        return Group.SHARED
    if adapter == PRIVATE_ADAPTER:
        return Group.PRIVATE
    raise ValueError(
        f"parameter {name!r} belongs to adapter {adapter!r}; fedpref only knows "
        f"{SHARED_ADAPTER!r} and {PRIVATE_ADAPTER!r}"
    )


def names_in(names: Iterable[str], group: Group) -> list[str]:
    """The names in ``names`` that belong to ``group``, in the given order."""
    return [n for n in names if group_of(n) is group]
