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
from pathlib import Path

from flwr.simulation.run_simulation import _run_simulation
from flwr.supercore.telemetry import EventType

from fedpref.client.app import make_client_app
from fedpref.protocol.runconfig import Method
from fedpref.server.app import make_server_app
from fedpref.simulations.config import RuntimeConfig


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
    tamper_safety: tuple[str, ...] = (),
    verbose: bool = False,
) -> None:
    """One federated run (``aggregated`` or ``personalized``): each user is one virtual node.

    With ``policy`` (a signed envelope) and ``root`` the server distributes the policy and
    every device verifies it against ``root``; ``tamper_safety`` names users whose devices
    perturb their safety weights (the tampered-client experiment).
    """
    settings = {
        "config": str(config_file), "data": str(data), "workdir": str(workdir),
        "method": method.value, "cache": str(cache or ""), "seed": runtime.seed,
        "policy": str(policy or ""), "root": str(root or ""), "tamper-safety": ",".join(tamper_safety),
        "secure-aggregation": runtime.secure_aggregation,
        "deterministic-noise": runtime.deterministic_noise,
    }
    init_args: dict = {"include_dashboard": False, "num_cpus": os.cpu_count() or 1}
    if runtime.ray_address:
        init_args = {"address": runtime.ray_address}
    backend_config = {
        "client_resources": {"num_cpus": runtime.client_cpus, "num_gpus": 0.0},
        "init_args": init_args,
    }
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.WARNING)
    _run_simulation(
        num_supernodes=num_users,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app=make_client_app(settings),
        server_app=make_server_app(settings),
        backend_name="ray",
        backend_config=backend_config,
        verbose_logging=verbose,
    )
