"""common/polling.py: a poller's wait is proportional to its last poll's cost, within bounds."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedpref.common.polling import duty_wait


def test_pinned_values() -> None:
    assert duty_wait(0.0, low=0.01, high=0.1, duty=0.05) == 0.01
    assert duty_wait(0.002, low=0.01, high=0.1, duty=0.05) == pytest.approx(0.038)
    assert duty_wait(0.002, low=0.01, high=0.1, duty=0.5) == 0.01  # cheap polls, a generous share: the floor
    assert duty_wait(0.5, low=0.01, high=0.1, duty=0.05) == 0.1


@given(st.floats(0, 10), st.floats(1e-4, 1), st.floats(0.01, 0.99))
def test_the_share_is_duty_unless_a_bound_holds(poll: float, low: float, duty: float) -> None:
    high = 10 * low
    wait = duty_wait(poll, low=low, high=high, duty=duty)
    assert low <= wait <= high
    if low < wait < high:
        assert poll / (poll + wait) == pytest.approx(duty)
    elif wait == low:
        assert poll * (1 / duty - 1) <= low * (1 + 1e-12)
    else:
        assert poll * (1 / duty - 1) >= high * (1 - 1e-12)


@pytest.mark.parametrize("kw", [dict(duty=0.0), dict(duty=1.0), dict(low=0.0), dict(low=0.2, high=0.1)])
def test_nonsense_bounds_are_refused(kw: dict) -> None:
    args = dict(low=0.01, high=0.1, duty=0.05) | kw
    with pytest.raises(ValueError, match="duty_wait"):
        duty_wait(0.001, **args)
