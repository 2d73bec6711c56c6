"""simulations/dispatch.py: the indexed poll hands the workers exactly what Flower's own poll does,
on Flower's real in-memory LinkState, in one store scan instead of one per node."""

from __future__ import annotations

import contextlib
import threading
from queue import Empty, Queue

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.task_identity import TaskIdentity
from flwr.supercore.run import Run
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from fedpref.simulations import dispatch
from fedpref.simulations.dispatch import indexed_dispatch, take_undelivered

FLOWER_POLL = vce_api.add_messages_to_queue


@contextlib.contextmanager
def superlink_identity():  # noqa: ANN201
    """The process-wide identity ``_run_simulation`` sets for its run (run 7 here), restored after:
    what :func:`federation`'s grid needs (other test files use it too)."""
    saved = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id  # noqa: SLF001
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved  # noqa: SLF001


@pytest.fixture(autouse=True)
def task_identity():  # noqa: ANN201
    with superlink_identity():
        yield


def federation(nodes: int, layout: list[int]):  # noqa: ANN201
    """A real Simulation Engine state as ``_run_simulation`` builds it, with ``nodes`` nodes and
    one message for each partition index in ``layout`` (repeats: several messages to one node),
    pushed in that order. Returns (state, nodes mapping, grid)."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    mapping = vce_api._register_nodes(nodes, factory)  # noqa: SLF001 - what start_vce does
    state = factory.state()
    run = Run.create_empty(run_id=7)
    run.primary_task_id = 1
    run.federation_id = NOOP_FEDERATION_ID
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[1] = Task(task_id=1, run_id=run.run_id)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    by_partition = {p: n for n, p in mapping.items()}
    grid.push_messages([Message(RecordDict({"c": ConfigRecord({"i": i, "p": p})}), by_partition[p], "train")
                        for i, p in enumerate(layout)])
    return state, mapping, grid


def tags(messages, mapping) -> list[tuple[int, int]]:  # noqa: ANN001
    """(partition, message index) of each message: comparable across two states (node ids are random)."""
    return [(mapping[m.metadata.dst_node_id], int(m.content["c"]["i"])) for m in messages]


def flower_one_poll(state, mapping) -> list:  # noqa: ANN001
    """One pass of Flower's own add_messages_to_queue loop (stopped before its second pass)."""

    class OnePass(threading.Event):
        calls = 0

        def is_set(self) -> bool:
            OnePass.calls += 1
            return OnePass.calls > 1

        def wait(self, timeout=None) -> bool:  # noqa: ANN001
            return True

    q: Queue = Queue()
    FLOWER_POLL(state, q, mapping, OnePass())
    return [q.get_nowait() for _ in range(q.qsize())]


LAYOUTS = [
    [0, 1, 2, 3],  # one message a node (a round)
    [3, 1, 3, 0, 1, 1],  # several to one node: one a poll, in the store's order
    [],  # nothing pending
    [5, 9, 2],  # most nodes without a message
]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_poll_matches_flowers_own(layout: list[int]) -> None:
    a, map_a, _ = federation(12, layout)
    b, map_b, _ = federation(12, layout)
    for _ in range(4):  # successive polls drain the repeats one by one, identically
        assert tags(take_undelivered(b, dict.fromkeys(map_b)), map_b) == tags(flower_one_poll(a, map_a), map_a)


def expire(state, mapping, partition: int) -> None:  # noqa: ANN001
    """The messages to ``partition`` outlive their TTL (created a TTL and a second ago)."""
    for msg in state.message_ins_store.values():
        if mapping[msg.metadata.dst_node_id] == partition:
            msg.metadata.__dict__["_created_at"] = msg.metadata.created_at - msg.metadata.ttl - 1


def test_one_poll_matches_flowers_own_at_the_edges() -> None:
    """Expired messages, nodes outside the mapping served, and messages delivered but not yet
    answered: the same messages handed over, and the same left in the store, as Flower's poll."""
    layout = [0, 1, 2, 3, 1, 4, 0]
    a, map_a, _ = federation(6, layout)
    b, map_b, _ = federation(6, layout)
    for state, mapping in ((a, map_a), (b, map_b)):
        expire(state, mapping, 2)
        first = next(m for m in state.message_ins_store.values() if mapping[m.metadata.dst_node_id] == 0)
        first.metadata.delivered_at = "2026-11-29T00:00:00+00:00"  # handed over earlier, reply pending
    served_a = {n: p for n, p in map_a.items() if p != 3}  # partition 3: a node this engine does not serve
    served_b = {n: p for n, p in map_b.items() if p != 3}
    for _ in range(3):
        assert tags(take_undelivered(b, dict.fromkeys(served_b)), map_b) == tags(flower_one_poll(a, served_a), map_a)
    left = [sorted(tags(s.message_ins_store.values(), m)) for s, m in ((a, map_a), (b, map_b))]
    assert left[0] == left[1] == [(0, 0), (0, 6), (1, 1), (1, 4), (3, 3), (4, 5)]


def test_a_poll_marks_delivered_and_never_hands_a_message_twice() -> None:
    state, mapping, _ = federation(6, [0, 1, 1, 4])
    order = dict.fromkeys(mapping)
    first = take_undelivered(state, order)
    assert tags(first, mapping) == [(0, 0), (1, 1), (4, 3)]
    assert all(m.metadata.delivered_at != "" for m in first)
    assert tags(take_undelivered(state, order), mapping) == [(1, 2)]
    assert take_undelivered(state, order) == []
    # Flower's own poll agrees that nothing is left
    assert all(state.get_message_ins(node_id=n, limit=1) == [] for n in mapping)


def test_only_the_mappings_nodes_are_served() -> None:
    state, mapping, _ = federation(4, [0, 1, 2, 3])
    some = {n: None for n, p in mapping.items() if p in (1, 3)}
    assert sorted(tags(take_undelivered(state, some), mapping)) == [(1, 1), (3, 3)]
    rest = {n: None for n in mapping if n not in some}
    assert sorted(tags(take_undelivered(state, rest), mapping)) == [(0, 0), (2, 2)]


def test_expired_messages_are_dropped_by_flowers_check() -> None:
    state, mapping, _ = federation(3, [0, 1, 2])
    expire(state, mapping, 1)
    assert tags(take_undelivered(state, dict.fromkeys(mapping)), mapping) == [(0, 0), (2, 2)]
    assert len(state.message_ins_store) == 2  # deleted, as get_message_ins would have


def test_the_swap_lasts_one_run_and_only_on_the_checked_flower() -> None:
    assert vce_api.add_messages_to_queue is FLOWER_POLL and vce_api.Queue is Queue
    with indexed_dispatch() as on:
        assert on and vce_api.add_messages_to_queue is not FLOWER_POLL
        assert isinstance(vce_api.Queue(), dispatch.PromptQueue)  # what run_api builds its queues from
        with indexed_dispatch() as nested:  # a nested run keeps the swap
            assert nested
        assert vce_api.add_messages_to_queue is not FLOWER_POLL
    assert vce_api.add_messages_to_queue is FLOWER_POLL
    with indexed_dispatch(version="9.9.9") as on:
        assert not on and vce_api.add_messages_to_queue is FLOWER_POLL
    with pytest.raises(RuntimeError), indexed_dispatch():
        raise RuntimeError("a run that fails")
    assert vce_api.add_messages_to_queue is FLOWER_POLL and vce_api.Queue is Queue


def test_flowers_threads_wait_on_their_queues_in_short_slices(monkeypatch) -> None:
    """Flower's worker and reply threads block on ``get(timeout=1.0)`` before each look at the
    run's stop flag: the prompt queue blocks 0.1 s at most, and still hands items over as they come."""
    waits: list[object] = []
    real_get = Queue.get

    def spy(self, block=True, timeout=None):  # noqa: ANN001, ANN202 - Queue.get itself, its timeouts recorded
        waits.append(timeout if block else "nowait")
        return real_get(self, block, timeout)

    monkeypatch.setattr(Queue, "get", spy)
    q = dispatch.PromptQueue()
    with pytest.raises(Empty):
        q.get(timeout=1.0)  # Flower's worker, with nothing to do
    q.put("m")
    assert q.get(timeout=1.0) == "m"
    with pytest.raises(Empty):
        q.get(timeout=0.05)  # a shorter wait stays as asked
    with pytest.raises(Empty):
        q.get(block=False)
    assert waits == [dispatch.QUEUE_WAIT_S, dispatch.QUEUE_WAIT_S, 0.05, "nowait"]
    # and the stop flag ends Flower's own reply thread promptly: it returns once the flag is set
    stop = threading.Event()
    th = threading.Thread(target=vce_api.put_message_into_state, args=(None, q, stop))
    th.start()
    while len(waits) < 5:  # it is waiting (its first get has returned Empty at least once)
        th.join(timeout=0.01)
    stop.set()
    th.join(timeout=30)
    assert not th.is_alive()
    assert set(waits[4:]) == {dispatch.QUEUE_WAIT_S}  # each of its 1 s waits, cut to the slice


def test_the_swapped_loop_feeds_the_queue_until_stopped() -> None:
    state, mapping, _ = federation(5, [4, 2, 2])
    q: Queue = Queue()
    stop = threading.Event()
    with indexed_dispatch():
        th = threading.Thread(target=vce_api.add_messages_to_queue, args=(state, q, mapping, stop))
        th.start()
        got = [q.get(timeout=10) for _ in range(3)]
        stop.set()
        th.join(timeout=10)
    assert not th.is_alive()
    assert tags(got, mapping) == [(2, 1), (4, 0), (2, 2)]  # node order within a poll, repeats in later polls


def test_the_tested_flower_is_the_pinned_one() -> None:
    import importlib.metadata

    assert importlib.metadata.version("flwr") == dispatch.DISPATCH_TESTED_FLWR


def test_the_poller_waits_in_proportion_to_its_own_cost() -> None:
    assert dispatch.poll_wait(0.0) == dispatch.MIN_POLL_S  # an empty store: poll soon
    assert dispatch.poll_wait(0.0012) == pytest.approx(0.0228)  # 1,000 stored messages: 5 % of a core
    assert 0.0012 / (0.0012 + dispatch.poll_wait(0.0012)) == pytest.approx(dispatch.POLL_DUTY)
    assert dispatch.poll_wait(1.0) == dispatch.MAX_POLL_S  # never slower than Flower's own poll


def test_any_other_linkstate_gets_flowers_own_poll(tmp_path, monkeypatch) -> None:
    """A SQLite LinkState (what a SuperLink with a database uses) is polled by Flower's own loop."""
    from flwr.server.superlink.linkstate import SqlLinkState

    factory = LinkStateFactory(str(tmp_path / "state.db"), NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    assert isinstance(state, SqlLinkState)
    calls: list[object] = []
    monkeypatch.setattr(dispatch, "take_undelivered", lambda *a: pytest.fail("the indexed poll ran on SQLite"))
    stop = threading.Event()
    stop.set()
    with indexed_dispatch():
        assert dispatch._flower_poll_fn is FLOWER_POLL  # noqa: SLF001 - what the swap keeps
        dispatch._flower_poll_fn = lambda *args: calls.append(args[0])  # noqa: SLF001 - Flower's poll, observed
        vce_api.add_messages_to_queue(state, Queue(), {}, stop)
    assert calls == [state] and dispatch._flower_poll_fn is None  # noqa: SLF001


def test_the_server_collects_simulation_replies_on_its_own_short_poll() -> None:
    """server.app.send_and_receive on the Simulation Engine's InMemoryGrid: every reply collected,
    polled every SIM_REPLY_POLL_S (not the grid's own 0.1 s loop), and a timeout still ends it."""
    from fedpref.server import app as server_app

    state, mapping, grid = federation(3, [])
    nodes = list(mapping)
    msgs = [Message(RecordDict({"c": ConfigRecord({"i": i, "p": mapping[n]})}), n, "train") for i, n in enumerate(nodes)]
    pulls: list[int] = []
    real_pull = grid.pull_messages

    def counting_pull(ids):  # noqa: ANN001, ANN202
        pulls.append(1)
        return real_pull(ids)

    grid.pull_messages = counting_pull  # type: ignore[method-assign]

    def answer_all() -> None:  # the ClientApp side: take each message, reply once, 0.3 s after the push
        import time as _t

        _t.sleep(0.3)
        for n in nodes:
            for m in state.get_message_ins(node_id=n, limit=1):
                reply = Message(RecordDict({"c": ConfigRecord({"ok": 1})}), reply_to=m)
                reply.metadata.__dict__["_message_id"] = f"r{n}"
                state.store_message_res(reply)

    th = threading.Thread(target=answer_all)
    th.start()
    replies = server_app.send_and_receive(grid, msgs, timeout=30)
    th.join()
    assert sorted(mapping[r.metadata.src_node_id] for r in replies) == [0, 1, 2]
    # polled every ~20 ms while it waited 0.3 s (~15 pulls); the grid's own 0.1 s loop makes 4
    assert len(pulls) >= 8
    state2, mapping2, grid2 = federation(2, [])
    lone = [Message(RecordDict({"c": ConfigRecord({"i": 0, "p": 0})}), next(iter(mapping2)), "train")]
    assert list(server_app.send_and_receive(grid2, lone, timeout=0.05)) == []  # nobody answers: the timeout ends it
