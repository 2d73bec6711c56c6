"""How long a poller waits between polls, so that polling costs a bounded share of a core.

Both of the simulation's in-process pollers (the Simulation Engine's dispatcher,
:mod:`fedpref.simulations.dispatch`, and the ServerApp's reply loop on Flower's InMemoryGrid,
:func:`fedpref.server.app.send_and_receive`) scan a store whose size changes over a round:
thousands of messages at a round's start, a handful near its end, when the devices' last
replies are what everyone waits for. A fixed interval is either slow at the end or costly at
the start; waiting in proportion to the last poll's own cost is neither.
"""

from __future__ import annotations


def duty_wait(poll_seconds: float, *, low: float, high: float, duty: float) -> float:
    """Seconds to wait after a poll that took ``poll_seconds``: ``poll_seconds · (1/duty − 1)``,
    so that polling takes ``duty`` of a core, but never less than ``low`` and never more than
    ``high`` (above ``high · duty / (1 − duty)`` seconds a poll, the share exceeds ``duty``)."""
    if not 0 < duty < 1 or not 0 < low <= high:
        raise ValueError(f"duty_wait: need 0 < duty < 1 and 0 < low <= high, got duty={duty}, low={low}, high={high}")
    return min(high, max(low, poll_seconds * (1 / duty - 1)))


__all__ = ["duty_wait"]
