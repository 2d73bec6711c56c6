"""Tests for fedpref.common.exit_codes."""

from __future__ import annotations

import pytest

from fedpref.common.errors import (
    BudgetExceededError,
    ConfigError,
    DataError,
    FedPrefError,
    IntegrityError,
)
from fedpref.common.exit_codes import (
    EXIT_CODE_HELP,
    ExitCode,
    exit_code_for,
    exit_on_error,
    fail,
)


def test_every_code_has_help_text() -> None:
    for code in ExitCode:
        assert EXIT_CODE_HELP.get(code, "").strip(), f"{code.name} has no help text"
    assert set(EXIT_CODE_HELP) == set(ExitCode)


def test_codes_are_unique_and_in_range() -> None:
    # IntEnum would silently make a duplicate value an alias; catch that here.
    assert len(ExitCode.__members__) == len({int(c) for c in ExitCode})
    assert ExitCode.SUCCESS == 0 and all(0 <= c <= 255 for c in ExitCode)


def test_fail_prints_one_line_and_exits(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        fail(ExitCode.DATA, "ledger.jsonl:3: not valid JSON\n  more detail")
    assert done.value.code == 4
    captured = capsys.readouterr()
    assert captured.err == "error: ledger.jsonl:3: not valid JSON more detail\n"
    assert captured.out == ""


@pytest.mark.parametrize(
    ("error", "code"),
    [(ConfigError("x"), ExitCode.CONFIG), (DataError("x"), ExitCode.DATA),
     (BudgetExceededError("x"), ExitCode.BUDGET_EXCEEDED),
     (IntegrityError("x"), ExitCode.INTEGRITY), (FedPrefError("x"), ExitCode.INTERNAL)],
)
def test_exit_code_for_each_error_kind(error: FedPrefError, code: ExitCode) -> None:
    assert exit_code_for(error) is code


def test_exit_on_error_converts_fedpref_errors_only(capsys) -> None:
    with pytest.raises(SystemExit) as done, exit_on_error():
        raise BudgetExceededError("round 4 would bring user-level epsilon to 3.1 > 3")
    assert done.value.code == ExitCode.BUDGET_EXCEEDED
    assert capsys.readouterr().err.startswith("error: round 4 would bring")
    with pytest.raises(KeyError), exit_on_error():  # a bug stays a bug, with its traceback
        raise KeyError("boom")
