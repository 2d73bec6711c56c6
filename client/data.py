"""Per-user preference pairs: the JSONL schema, a strict loader and an atomic writer.

One JSON object per line::

    {"user_id": "u000", "community": "casual", "prompt": "...", "chosen": "...",
     "rejected": "...", "split": "train", "oracle_margin": 1.7}

Required: ``user_id``, ``prompt``, ``chosen``, ``rejected`` (non-empty strings) and ``split``
(``"train"`` or ``"test"``). Optional: ``community``, ``chosen_category``,
``rejected_category`` (non-empty strings or null) and ``oracle_margin`` (a finite number).
Unknown fields are ignored and blank lines are skipped, so the same loader reads real
per-user preference data. Every error is a :class:`DataError` whose message is one line:
``FILE:LINE: what is wrong (field, value); how to fix it``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from fedpref.common.atomic import write_atomic
from fedpref.common.errors import DataError
from fedpref.common.jsonl import read_jsonl

REQUIRED_FIELDS = ("user_id", "prompt", "chosen", "rejected", "split")
OPTIONAL_STR_FIELDS = ("community", "chosen_category", "rejected_category")


class Split(str, Enum):
    """Which half of a user's data a pair belongs to."""

    TRAIN = "train"
    TEST = "test"


@dataclass(frozen=True)
class PreferencePair:
    """One user's judgement: ``chosen`` was preferred to ``rejected`` for ``prompt``."""

    user_id: str
    prompt: str
    chosen: str
    rejected: str
    split: Split
    community: str | None = None
    oracle_margin: float | None = None  # true u(chosen) - u(rejected); P(chosen wins) = sigmoid(margin)
    chosen_category: str | None = None  # None if safe, else its unsafe category
    rejected_category: str | None = None

    def to_json(self) -> dict:
        """A JSON-ready dict; optional fields that are None are left out."""
        out: dict = {"user_id": self.user_id}
        if self.community is not None:
            out["community"] = self.community
        out.update(prompt=self.prompt, chosen=self.chosen, rejected=self.rejected, split=Split(self.split).value)
        for key in ("oracle_margin", "chosen_category", "rejected_category"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


@dataclass(frozen=True)
class UserData:
    """All pairs of one user, split into train and test (each non-empty)."""

    user_id: str
    community: str | None
    train: tuple[PreferencePair, ...]
    test: tuple[PreferencePair, ...]


def _short(value: object, limit: int = 40) -> str:
    """repr() of a value on one line, cut to ``limit`` characters."""
    text = repr(value).replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse(obj: object, where: str) -> PreferencePair:
    """Validate one decoded JSON line; ``where`` is ``FILE:LINE``."""
    if not isinstance(obj, dict):
        raise DataError(
            f"{where}: line is not a JSON object (line, {type(obj).__name__}); "
            'write one object per line like {"user_id": ..., "prompt": ..., ...}'
        )
    for key in REQUIRED_FIELDS:
        if key not in obj:
            raise DataError(
                f"{where}: missing required field ({key}, absent); every line needs {', '.join(REQUIRED_FIELDS)}"
            )
    for key in REQUIRED_FIELDS[:4]:
        value = obj[key]
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: field must be a non-empty string ({key}, {_short(value)}); give it text")
    split = obj["split"]
    if split not in ("train", "test"):
        raise DataError(f"{where}: split must be 'train' or 'test' (split, {_short(split)}); use one of the two")
    for key in OPTIONAL_STR_FIELDS:
        value = obj.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise DataError(
                f"{where}: optional field must be a non-empty string or null ({key}, {_short(value)}); "
                "fix it or leave it out"
            )
    margin = obj.get("oracle_margin")
    if margin is not None:
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            raise DataError(
                f"{where}: oracle_margin must be a finite number (oracle_margin, {_short(margin)}); "
                "fix it or leave it out"
            )
        margin = float(margin)
    if obj["chosen"] == obj["rejected"]:
        raise DataError(
            f"{where}: chosen and rejected are the same text (chosen, {_short(obj['chosen'])}); "
            "a pair needs two different responses"
        )
    return PreferencePair(
        user_id=obj["user_id"],
        prompt=obj["prompt"],
        chosen=obj["chosen"],
        rejected=obj["rejected"],
        split=Split(split),
        community=obj.get("community"),
        oracle_margin=margin,
        chosen_category=obj.get("chosen_category"),
        rejected_category=obj.get("rejected_category"),
    )


def load_jsonl(path: str | os.PathLike[str]) -> list[PreferencePair]:
    """Read and validate a JSONL file of preference pairs, in file order.

    Besides per-line checks, the whole file must hold at least one pair, every user must have
    at least one train and one test pair, and a user's community must not change.
    """
    name = str(path)
    pairs: list[PreferencePair] = []
    first_line: dict[str, int] = {}  # user_id -> line of its first pair
    seen: dict[str, set[Split]] = {}
    community: dict[str, str | None] = {}
    for lineno, obj in read_jsonl(path):
        where = f"{name}:{lineno}"
        pair = _parse(obj, where)
        uid = pair.user_id
        if uid not in first_line:
            first_line[uid], seen[uid], community[uid] = lineno, set(), pair.community
        elif pair.community is not None and community[uid] not in (None, pair.community):
            raise DataError(
                f"{where}: user {uid!r} changes community (community, {_short(pair.community)}); "
                f"line {first_line[uid]} says {community[uid]!r}, give each user one community"
            )
        elif community[uid] is None:
            community[uid] = pair.community
        seen[uid].add(pair.split)
        pairs.append(pair)
    if not pairs:
        raise DataError(f"{name}:1: file has no preference pairs (pairs, 0); write at least one JSON object line")
    for uid, splits in seen.items():
        for split in Split:
            if split not in splits:
                raise DataError(
                    f"{name}:{first_line[uid]}: user has no {split.value} pairs (user_id, {uid!r}); "
                    "give every user at least one train and one test pair, or drop the user"
                )
    return pairs


def group_by_user(pairs: Iterable[PreferencePair]) -> dict[str, UserData]:
    """Group pairs by user, keys sorted by user_id; pairs keep their input order."""
    train: dict[str, list[PreferencePair]] = {}
    test: dict[str, list[PreferencePair]] = {}
    community: dict[str, str | None] = {}
    for p in pairs:
        train.setdefault(p.user_id, [])
        test.setdefault(p.user_id, [])
        if community.get(p.user_id) is None:
            community[p.user_id] = p.community
        (train if Split(p.split) is Split.TRAIN else test)[p.user_id].append(p)
    out: dict[str, UserData] = {}
    for uid in sorted(train):
        for split, bucket in ((Split.TRAIN, train), (Split.TEST, test)):
            if not bucket[uid]:
                raise DataError(
                    f"<pairs>:0: user has no {split.value} pairs (user_id, {uid!r}); "
                    "give every user at least one train and one test pair"
                )
        out[uid] = UserData(uid, community[uid], tuple(train[uid]), tuple(test[uid]))
    return out


def write_jsonl(records: Iterable[dict | PreferencePair], path: str | os.PathLike[str]) -> None:
    """Write one JSON object per line, atomically (temp file in the same folder, fsync, rename)."""

    def fill(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            for rec in records:
                obj = rec.to_json() if isinstance(rec, PreferencePair) else rec
                fh.write(json.dumps(obj, ensure_ascii=False, allow_nan=False) + "\n")

    write_atomic(path, fill, mode=0o600)
