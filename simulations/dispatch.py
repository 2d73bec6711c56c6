"""Flower's Simulation Engine dispatcher, at one scan of the message store a poll.

Flower 1.42's ``vce_api.add_messages_to_queue`` (the thread that hands the ServerApp's
messages to the ClientApp workers) polls every 0.1 s by calling
``state.get_message_ins(node_id, limit=1)`` once for *every* registered node, and
``InMemoryLinkState.get_message_ins`` scans every stored message, running its expiry and
federation check (``_check_stored_messages``) on each, for each node. A poll therefore costs
nodes × messages checks, under the state's lock: at 1,000 nodes and a round of 100–1,000
messages, a poll takes longer than its 0.1 s period, so the thread never rests. Measured with
py-spy on ``make bench-scale`` (seed 0): that thread used 96 s of the driver's CPU during the
federations' 142 s of wall time, on a two-core machine whose two ClientApp actors need both
cores.

:func:`take_undelivered` hands over exactly what one of Flower's polls does (per node, in the
node mapping's order, its first undelivered message in the store's order, marked delivered),
after the same checks, run once per message instead of once per message per node: 1.2 ms a
poll with 1,000 nodes and 1,000 stored messages, against 1.06 s for Flower's. Being cheap, it
polls more often than Flower's every 100 ms: it waits 19 times its last poll, 10 ms at the
least (below about 440 stored messages) and 100 ms at the most (:func:`poll_wait`).
:func:`indexed_dispatch` swaps it into ``vce_api`` for one run, the way
:mod:`fedpref.simulations.engine` swaps its Ray backend: messages still go through Flower's
LinkState, its worker threads and its Ray backend; only the scan changes, and how long those
threads block on their queues before they look for the end of the run (:class:`PromptQueue`).
With any other LinkState, or any other Flower than the one this was checked against, Flower's
own poll runs.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from queue import Queue

from fedpref.common.polling import duty_wait

DISPATCH_TESTED_FLWR = "1.42.0"  # the Flower release whose vce_api and InMemoryLinkState this mirrors
MAX_POLL_S = 0.1  # Flower's own interval (vce_api.add_messages_to_queue)
MIN_POLL_S = 0.01
POLL_DUTY = 0.05  # the poller's share of one core while a poll takes under ~5 ms (~4,400 stored messages)
_flower_poll_fn = None  # Flower's own add_messages_to_queue while ours is swapped in
log = logging.getLogger(__name__)


def take_undelivered(state, node_ids: Mapping[int, object]) -> list:  # noqa: ANN001 - InMemoryLinkState -> list[Message]
    """One poll of Flower's dispatcher over ``state`` (an ``InMemoryLinkState``): for each node of
    ``node_ids`` in its order, the first message addressed to it that is not delivered yet, in
    the store's order, now marked delivered. Expired messages, and messages whose nodes left the
    federation, are deleted first, by Flower's own check, as ``get_message_ins`` does."""
    from flwr.supercore.date import now

    with state.lock:
        ids = list(state.message_ins_store)
        state._check_stored_messages(set(ids))  # noqa: SLF001 - Flower's expiry and federation check
        first: dict[int, object] = {}
        for msg_id in ids:
            msg = state.message_ins_store.get(msg_id)
            if msg is None:  # deleted by the check
                continue
            md = msg.metadata
            if md.delivered_at == "" and md.dst_node_id in node_ids and md.dst_node_id not in first:
                first[md.dst_node_id] = msg
        taken = [first[n] for n in node_ids if n in first]
        delivered_at = now().isoformat()
        for msg in taken:
            msg.metadata.delivered_at = delivered_at
    return taken


def _indexed_add_messages_to_queue(state, queue: Queue, nodes_mapping: Mapping[int, int],  # noqa: ANN001
                                   f_stop: threading.Event) -> None:
    """``vce_api.add_messages_to_queue`` with :func:`take_undelivered` as its poll."""
    from flwr.server.superlink.linkstate import InMemoryLinkState

    if not isinstance(state, InMemoryLinkState):
        _flower_poll(state, queue, nodes_mapping, f_stop)
        return
    order = dict.fromkeys(nodes_mapping)  # ordered, O(1) membership
    while not f_stop.is_set():
        t0 = time.perf_counter()
        for msg in take_undelivered(state, order):
            queue.put(msg)
        f_stop.wait(poll_wait(time.perf_counter() - t0))


def poll_wait(poll_seconds: float) -> float:
    """Seconds to wait after a poll that took ``poll_seconds`` (:func:`~fedpref.common.polling.duty_wait`):
    soon, so a round's messages reach the workers a few ms after the server pushes them (Flower's
    0.1 s poll took 50 ms on average), but not so often that the poller takes more than
    ``POLL_DUTY`` of a core from the ClientApp actors (a poll scans every stored message: ~1.2 ms
    at 1,000), and never less often than Flower's own poll."""
    return duty_wait(poll_seconds, low=MIN_POLL_S, high=MAX_POLL_S, duty=POLL_DUTY)


QUEUE_WAIT_S = 0.1  # the longest a Simulation Engine thread now blocks on its queue before it checks for the run's end


class PromptQueue(Queue):
    """The queue ``vce_api.run_api`` builds for its messages and replies, with every blocking wait
    cut to :data:`QUEUE_WAIT_S`. Flower's worker threads (one per ClientApp actor) and its reply
    thread wait on these queues with a 1 s timeout and only then look at the run's stop flag, so
    every federation ended up to a second after its ServerApp did (measured: 0.93–0.96 s). An
    item put on the queue is still taken at once; a thread with nothing to do wakes 10 times a
    second instead of once, and sees the end of the run within 0.1 s."""

    def get(self, block: bool = True, timeout: float | None = None):  # noqa: ANN201
        if block and timeout is not None and timeout > QUEUE_WAIT_S:
            timeout = QUEUE_WAIT_S
        return super().get(block, timeout)


def _flower_poll(*args) -> None:  # noqa: ANN002
    from flwr.server.superlink.fleet.vce import vce_api

    (_flower_poll_fn or vce_api.add_messages_to_queue)(*args)


@contextlib.contextmanager
def indexed_dispatch(version: str | None = None) -> Iterator[bool]:
    """Within: the Simulation Engine polls with :func:`take_undelivered`, and its threads wait on
    :class:`PromptQueue` s. Yields whether it does (not with a Flower other than
    ``DISPATCH_TESTED_FLWR``; then Flower's own poll and queues, unchanged)."""
    global _flower_poll_fn
    from flwr.server.superlink.fleet.vce import vce_api

    version = version or importlib.metadata.version("flwr")
    current, flower_queue = vce_api.add_messages_to_queue, vce_api.Queue
    if version != DISPATCH_TESTED_FLWR:
        log.info("flwr %s: the Simulation Engine's own dispatcher (fedpref's indexed one is checked against %s)",
                 version, DISPATCH_TESTED_FLWR)
        yield False
        return
    if current is _indexed_add_messages_to_queue:  # already swapped (a nested run)
        yield True
        return
    _flower_poll_fn, vce_api.add_messages_to_queue = current, _indexed_add_messages_to_queue
    vce_api.Queue = PromptQueue  # what run_api builds its two queues from (looked up when it runs)
    try:
        yield True
    finally:
        if vce_api.add_messages_to_queue is _indexed_add_messages_to_queue:  # not re-patched by someone else since
            vce_api.add_messages_to_queue = current
        if vce_api.Queue is PromptQueue:
            vce_api.Queue = flower_queue
        _flower_poll_fn = None


__all__ = ["DISPATCH_TESTED_FLWR", "PromptQueue", "indexed_dispatch", "take_undelivered"]
