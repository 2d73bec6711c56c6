"""Run the fedpref ServerApp and ClientApp on Flower's Simulation Engine (Ray).

This is the API that ``flwr run`` uses for a local-simulation federation
(``flwr.simulation.run_simulation._run_simulation``, what ``flwr-simulation`` calls),
without the deprecated ``run_simulation`` wrapper. The apps are the very same objects as in
deployment, built with the run's settings baked in. ``ray_address`` lets the simulation
join an existing Ray cluster (``ray start --head`` on one machine, ``ray start
--address=HEAD:6379`` on the others); the work folder must then be on a shared filesystem.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from flwr.simulation.run_simulation import _run_simulation
from flwr.supercore.telemetry import EventType

from fedpref.client.app import SimulatedDevices, make_client_app
from fedpref.client.terms import DeviceTerms
from fedpref.common.errors import ConfigError, SimulationRuntimeError
from fedpref.common.processes import FLOWER_QUIET, TELEMETRY_SOURCE_PIN
from fedpref.protocol.runconfig import Method
from fedpref.server.app import make_server_app
from fedpref.simulations.config import RuntimeConfig, SimConfig


RAY_START_ATTEMPTS = 3
log = logging.getLogger(__name__)


def start_ray(init_args: dict, *, attempts: int = RAY_START_ATTEMPTS, backoff_s: float = 2.0) -> None:
    """Start (or join) Ray before the Simulation Engine does, retrying a failed start.

    Flower's Ray backend calls ``ray.init`` only when Ray is not initialised yet, and a failed
    ``ray.init`` there surfaces as a ServerApp waiting on nodes that never come (or a SecAgg+
    round halted for lack of nodes). Starting Ray here turns that into a retry, then one clear
    error with Ray's reason. The backend's own ``ray.shutdown`` still ends the session after
    the run. The PYTHONPATH handling mirrors ``RayBackend.init_ray``.
    """
    import ray

    if ray.is_initialized():
        return
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    if "address" in init_args:
        attempts = 1  # joining a cluster already waits on its GCS for minutes; don't multiply that
    last: Exception | None = None
    for attempt in range(1, attempts + 1):
        try:
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **init_args)
            return
        except Exception as e:  # noqa: BLE001  (Ray raises bare Exception, RuntimeError, TimeoutError, ...)
            last = e
            log.warning("Ray did not start (attempt %d of %d): %s", attempt, attempts, e)
            try:
                ray.shutdown()  # kills whatever part of the head node did start
            except Exception:  # noqa: BLE001
                pass
            if attempt < attempts:
                time.sleep(backoff_s * attempt)
    where = f"joining {init_args['address']!r}" if "address" in init_args else "starting a local head node"
    raise SimulationRuntimeError(
        f"Ray failed {where} ({attempts} attempt{'s' if attempts > 1 else ''}): "
        f"{type(last).__name__}: {last}. Check free memory "
        "and space under /tmp, and Ray's logs in /tmp/ray/session_latest/logs"
    ) from last


def device_terms(cfg: SimConfig) -> DeviceTerms:
    """The simulated devices' own terms: the researcher's [local] settings as each device's floor
    (so every round at those settings is accepted) and metrics shared for the report's plots."""
    try:
        return DeviceTerms(min_noise_multiplier=cfg.local.dp_noise_multiplier, max_grad_norm=cfg.local.dp_max_grad_norm,
                           max_epsilon_sample=cfg.local.max_epsilon_sample, delta=cfg.federation.delta,
                           share_metrics=True)
    except ConfigError as e:
        raise ConfigError(f"[local] as the simulated devices' terms: {e}; devices never train without DP-SGD "
                          "noise, so local.dp_noise_multiplier must be > 0") from None


def quiet_flower() -> None:
    """A simulation sends nothing to Flower's telemetry service and writes no per-machine id:
    the environment (inherited by Ray's workers) turns telemetry and the update check off, and
    this process's Flower, which read its switch at import, is told the same."""
    from flwr.supercore import telemetry as flwr_telemetry

    os.environ.update(FLOWER_QUIET)
    flwr_telemetry.FLWR_TELEMETRY_ENABLED = "0"
    with flwr_telemetry.state_lock:  # create_event reads (and writes) ~/.flwr/source even when off
        flwr_telemetry.state["source"] = TELEMETRY_SOURCE_PIN.strip()


def run_on_simulation_engine(
    *,
    method: Method,
    num_users: int,
    data: Path,
    workdir: Path,
    config_file: Path,
    cache: Path | None,
    runtime: RuntimeConfig,
    policy: Path | None = None,
    root: Path | None = None,
    devices: SimulatedDevices | None = None,
    attribute_basis: str = "",
    verbose: bool = False,
) -> None:
    """One federated run (``aggregated`` or ``personalized``): each user is one virtual node.

    With ``policy`` (a signed envelope) and ``root`` the server distributes the policy and
    every device verifies it against ``root``. ``devices`` holds the simulated devices' terms
    and attack experiments (``tamper_safety``: users whose devices perturb their safety
    weights), passed in Python, never through the run config; by default, every device's
    terms are the config file's [local] settings (:func:`device_terms`).
    """
    if devices is None:
        from fedpref.simulations.config import load_sim_config

        devices = SimulatedDevices(terms=device_terms(load_sim_config(config_file)))
    settings = {
        "config": str(config_file), "data": str(data), "workdir": str(workdir),
        "method": method.value, "cache": str(cache or ""), "seed": runtime.seed,
        "policy": str(policy or ""), "root": str(root or ""),
        "secure-aggregation": runtime.secure_aggregation,
        "deterministic-noise": runtime.deterministic_noise,
        "attribute-basis": attribute_basis,
    }
    init_args: dict = {"include_dashboard": False, "num_cpus": os.cpu_count() or 1}
    if runtime.ray_address:
        init_args = {"address": runtime.ray_address}
    backend_config = {
        "client_resources": {"num_cpus": runtime.client_cpus, "num_gpus": 0.0},
        "init_args": init_args,
    }
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    quiet_flower()
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.WARNING)
    start_ray(init_args)
    _run_simulation(
        num_supernodes=num_users,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app=make_client_app(settings, devices=devices),
        server_app=make_server_app(settings),
        backend_name="ray",
        backend_config=backend_config,
        verbose_logging=verbose,
    )
