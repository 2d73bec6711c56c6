"""Starting Ray for the Simulation Engine: a failed start is retried, then one clear error."""

from __future__ import annotations

import pytest

from fedpref.common.errors import SimulationRuntimeError
from fedpref.common.exit_codes import ExitCode, exit_code_for
from fedpref.simulations.engine import start_ray


@pytest.mark.slow  # starts Ray
def test_a_start_that_ray_refuses_is_one_error_with_rays_reason():
    with pytest.raises(SimulationRuntimeError) as e:
        start_ray({"include_dashboard": False, "num_cpus": -1}, attempts=2, backoff_s=0)
    msg = str(e.value)
    assert "starting a local head node (2 attempts)" in msg
    assert "nonnegative" in msg  # Ray's own reason, not a generic "crashed"
    assert "/tmp/ray/session_latest/logs" in msg
    assert exit_code_for(e.value) is ExitCode.SIMULATION_RUNTIME
    import ray

    assert not ray.is_initialized()  # nothing half-started is left behind


@pytest.mark.slow  # starts Ray
def test_a_transient_failure_is_retried_and_the_next_start_is_real(monkeypatch):
    import ray

    real_init, calls = ray.init, []

    def flaky_init(*args, **kwargs):  # the first start fails as a loaded machine's GCS can
        calls.append(kwargs)
        if len(calls) == 1:
            raise TimeoutError("timed out waiting for the GCS server's port file")
        return real_init(*args, **kwargs)

    monkeypatch.setattr(ray, "init", flaky_init)
    try:
        start_ray({"include_dashboard": False, "num_cpus": 1}, attempts=3, backoff_s=0)
        assert len(calls) == 2
        assert ray.is_initialized()
        assert ray.cluster_resources()["CPU"] == 1
        assert "PYTHONPATH" in calls[1]["runtime_env"]["env_vars"]  # what Flower's backend passes too
        start_ray({"include_dashboard": False, "num_cpus": 1})  # already up: a no-op
        assert len(calls) == 2
    finally:
        ray.shutdown()


def test_a_simulation_turns_flowers_telemetry_off_and_writes_no_machine_id(tmp_path, monkeypatch):
    """fedpref-sim runs Flower in its own process: its telemetry switch (read once at import) and
    the environment its Ray workers inherit are both off, and an event writes no ~/.flwr/source."""
    import os

    from flwr.supercore import telemetry

    from fedpref.simulations.engine import quiet_flower

    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    monkeypatch.setattr(telemetry, "FLWR_TELEMETRY_ENABLED", "1")
    monkeypatch.setitem(telemetry.state, "source", None)
    quiet_flower()
    assert telemetry.FLWR_TELEMETRY_ENABLED == "0" and os.environ["FLWR_TELEMETRY_ENABLED"] == "0"
    assert os.environ["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    telemetry.create_event(telemetry.EventType.PING, None)  # what Flower does at start and end of a run
    assert not (tmp_path / "source").exists()
