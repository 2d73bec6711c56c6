"""The preference JSONL schema: round trips, grouping, atomic writes and one-line errors."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpref.client.data import (
    PreferencePair,
    Split,
    UserData,
    group_by_user,
    load_jsonl,
    write_jsonl,
)
from fedpref.common.errors import DataError, FedPrefError


def rec(user: str = "u1", split: str = "train", **kw) -> dict:
    """One valid record; keyword arguments override or add fields."""
    out = {"user_id": user, "prompt": "How?", "chosen": "Like this.", "rejected": "Like that.", "split": split}
    out.update(kw)
    return out


def write_lines(path: Path, lines: list[str | dict]) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return path


def valid_user(user: str = "u1") -> list[dict]:
    return [rec(user, "train"), rec(user, "test")]


# ---- schema and round trips -----------------------------------------------------------------
def test_to_json_omits_none_and_writes_split_as_string() -> None:
    p = PreferencePair("u1", "p", "a", "b", Split.TEST)
    assert p.to_json() == {"user_id": "u1", "prompt": "p", "chosen": "a", "rejected": "b", "split": "test"}
    q = PreferencePair("u1", "p", "a", "b", Split.TRAIN, community="c", oracle_margin=-0.5, rejected_category="fraud")
    assert q.to_json() == {
        "user_id": "u1",
        "community": "c",
        "prompt": "p",
        "chosen": "a",
        "rejected": "b",
        "split": "train",
        "oracle_margin": -0.5,
        "rejected_category": "fraud",
    }


def test_round_trip_with_every_field(tmp_path: Path) -> None:
    pairs = [
        PreferencePair("u2", "p1", "a 🙂", "b\nline two", Split.TRAIN, "casual", 1.25, None, "violence"),
        PreferencePair("u2", "p2", "c", "d", Split.TEST, "casual", -3.0, "fraud", None),
        PreferencePair("u1", "p3", "e", "f", Split.TRAIN),
        PreferencePair("u1", "p3", "f", "e", Split.TEST),
    ]
    path = tmp_path / "pairs.jsonl"
    write_jsonl(pairs, path)
    assert load_jsonl(path) == pairs
    assert len(path.read_text(encoding="utf-8").splitlines()) == 4


def test_blank_lines_skipped_and_unknown_fields_ignored(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", ["", json.dumps(rec(extra=1)), "   ", json.dumps(rec(split="test")), ""])
    pairs = load_jsonl(path)
    assert [p.split for p in pairs] == [Split.TRAIN, Split.TEST]
    assert all(isinstance(p.split, Split) for p in pairs)


def test_null_optional_fields_are_none(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "d.jsonl", [rec(community=None, oracle_margin=None), rec(split="test", oracle_margin=2)]
    )
    a, b = load_jsonl(path)
    assert a.community is None and a.oracle_margin is None
    assert b.oracle_margin == 2.0 and isinstance(b.oracle_margin, float)


def test_group_by_user_sorted_and_split(tmp_path: Path) -> None:
    lines = [
        rec("u2", "test"),
        rec("u1", "train", community="x"),
        rec("u2", "train"),
        rec("u1", "test"),
        rec("u2", "train", prompt="q2"),
    ]
    users = group_by_user(load_jsonl(write_lines(tmp_path / "d.jsonl", lines)))
    assert list(users) == ["u1", "u2"]
    assert isinstance(users["u1"], UserData) and users["u1"].community == "x"
    assert len(users["u2"].train) == 2 and len(users["u2"].test) == 1
    assert [p.prompt for p in users["u2"].train] == ["How?", "q2"]  # input order kept


def test_group_by_user_rejects_user_without_test_pairs() -> None:
    with pytest.raises(DataError, match=r"no test pairs \(user_id, 'u9'\)"):
        group_by_user([PreferencePair("u9", "p", "a", "b", Split.TRAIN)])


def test_write_jsonl_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    write_jsonl([rec()], path)
    before = path.read_bytes()
    with pytest.raises(TypeError):  # an object json cannot encode, after one good record
        write_jsonl([rec(), {"bad": object()}], path)
    assert path.read_bytes() == before  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # no temp file left


def test_write_jsonl_rejects_nan(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_jsonl([rec(oracle_margin=math.nan)], tmp_path / "x.jsonl")
    assert list(tmp_path.iterdir()) == []


texts = st.text(min_size=1, max_size=30).filter(lambda s: s.strip() != "")


@settings(max_examples=40, deadline=None)
@given(prompt=texts, chosen=texts, rejected=texts, margin=st.floats(allow_nan=False, allow_infinity=False))
def test_round_trip_property(prompt: str, chosen: str, rejected: str, margin: float) -> None:
    if chosen == rejected:
        rejected = rejected + "!"
    pairs = [
        PreferencePair("u", prompt, chosen, rejected, Split.TRAIN, oracle_margin=margin),
        PreferencePair("u", prompt, rejected, chosen, Split.TEST, oracle_margin=-margin),
    ]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "p.jsonl"
        write_jsonl(pairs, path)
        assert load_jsonl(path) == pairs


# ---- errors: FILE:LINE: what (field, value); fix --------------------------------------------
def load_error(path: Path) -> str:
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    msg = str(info.value)
    assert isinstance(info.value, FedPrefError)
    assert "\n" not in msg  # exactly one line
    assert msg.startswith(f"{path}:")
    assert "; " in msg  # a fix follows the reason
    return msg


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ('{"user_id": "u1", "prompt": ', "invalid JSON"),
        ("[1, 2, 3]", "expected a JSON object, got an array"),
        ('"just a string"', "expected a JSON object, got a string"),
        (json.dumps({k: v for k, v in rec().items() if k != "chosen"}), "missing required field (chosen, absent)"),
        (json.dumps({k: v for k, v in rec().items() if k != "split"}), "missing required field (split, absent)"),
        (json.dumps(rec(prompt=42)), "non-empty string (prompt, 42)"),
        (json.dumps(rec(user_id=None)), "non-empty string (user_id, None)"),
        (json.dumps(rec(rejected="")), "non-empty string (rejected, '')"),
        (json.dumps(rec(chosen="   ")), "non-empty string (chosen, '   ')"),
        (json.dumps(rec(split="val")), "split must be 'train' or 'test' (split, 'val')"),
        (json.dumps(rec(split="TRAIN")), "split must be 'train' or 'test' (split, 'TRAIN')"),
        (
            '{"user_id": "u1", "prompt": "p", "chosen": "a", "rejected": "b", "split": "train", "oracle_margin": NaN}',
            "invalid JSON (NaN is not a JSON number)",
        ),
        (json.dumps(rec(oracle_margin="1.0")), "finite number (oracle_margin, '1.0')"),
        (json.dumps(rec(oracle_margin=True)), "finite number (oracle_margin, True)"),
        (json.dumps(rec(community=3)), "(community, 3)"),
        (json.dumps(rec(chosen_category="")), "(chosen_category, '')"),
        (json.dumps(rec(chosen="same", rejected="same")), "same text (chosen, 'same')"),
    ],
)
def test_bad_line_names_file_line_and_reason(tmp_path: Path, bad_line: str, reason: str) -> None:
    path = tmp_path / "prefs.jsonl"
    path.write_text(
        "\n".join([json.dumps(rec()), "", bad_line, json.dumps(rec(split="test"))]) + "\n", encoding="utf-8"
    )
    msg = load_error(path)
    assert msg.startswith(f"{path}:3: ")  # line numbers count blank lines too
    assert reason in msg


def test_infinite_margin(tmp_path: Path) -> None:
    line = (
        '{"user_id": "u1", "prompt": "p", "chosen": "a", "rejected": "b", "split": "test", "oracle_margin": -Infinity}'
    )
    path = write_lines(tmp_path / "inf.jsonl", [rec(), rec(split="test"), line])
    msg = load_error(path)
    assert msg.startswith(f"{path}:3: ") and "invalid JSON (-Infinity is not a JSON number)" in msg


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("", encoding="utf-8")
    msg = load_error(path)
    assert msg.startswith(f"{path}:1: ") and "no preference pairs" in msg


def test_file_of_blank_lines_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "blank.jsonl"
    path.write_text("\n  \n\n", encoding="utf-8")
    assert "no preference pairs" in load_error(path)


@pytest.mark.parametrize(("missing", "present"), [("test", "train"), ("train", "test")])
def test_empty_user_names_user_and_first_line(tmp_path: Path, missing: str, present: str) -> None:
    lines = valid_user("u1") + [rec("u7", present), rec("u7", present, prompt="again")] + valid_user("u3")
    path = write_lines(tmp_path / "users.jsonl", lines)
    msg = load_error(path)
    assert msg.startswith(f"{path}:3: ")  # u7's first pair
    assert f"no {missing} pairs (user_id, 'u7')" in msg


def test_user_changing_community(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "c.jsonl", [rec(community="a"), rec(split="test", community="b")])
    msg = load_error(path)
    assert msg.startswith(f"{path}:2: ") and "changes community (community, 'b')" in msg and "line 1" in msg


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin.jsonl"
    path.write_bytes(json.dumps(rec()).encode() + b"\n" + b'{"user_id": "caf\xe9"}\n')
    msg = load_error(path)
    assert msg.startswith(f"{path}:2: ") and "UTF-8" in msg


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    msg = load_error(path)
    assert "cannot read" in msg
