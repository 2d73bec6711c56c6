"""Run the fedpref ServerApp and ClientApp on Flower's Simulation Engine (Ray).

This is the API that ``flwr run`` uses for a local-simulation federation
(``flwr.simulation.run_simulation._run_simulation``, what ``flwr-simulation`` calls),
without the deprecated ``run_simulation`` wrapper. The apps are the very same objects as in
deployment, built with the run's settings baked in. ``ray_address`` lets the simulation
join an existing Ray cluster (``ray start --head`` on one machine, ``ray start
--address=HEAD:6379`` on the others); the work folder must then be on a shared filesystem.

Inside :func:`ray_session` (what ``fedpref-sim run`` opens around all its federations),
consecutive runs share one Ray instance and its warm ClientApp actors: see :func:`ray_session`.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.simulation.run_simulation import _run_simulation
from flwr.supercore.telemetry import EventType

from fedpref.client.app import SimulatedDevices, make_client_app
from fedpref.client.terms import DeviceTerms
from fedpref.common.errors import ConfigError, SimulationRuntimeError
from fedpref.common.processes import FLOWER_QUIET, TELEMETRY_SOURCE_PIN
from fedpref.protocol.runconfig import Method
from fedpref.simulations.dispatch import indexed_dispatch

if TYPE_CHECKING:  # not imported at run time: ClientApp actors import this module (enter_run), and the
    # config module brings torch, which a device should import only inside its timed ClientApp call
    from fedpref.simulations.config import RuntimeConfig, SimConfig


RAY_START_ATTEMPTS = 3
log = logging.getLogger(__name__)


def start_ray(init_args: dict, *, attempts: int = RAY_START_ATTEMPTS, backoff_s: float = 2.0) -> None:
    """Start (or join) Ray before the Simulation Engine does, retrying a failed start.

    Flower's Ray backend calls ``ray.init`` only when Ray is not initialised yet, and a failed
    ``ray.init`` there surfaces as a ServerApp waiting on nodes that never come (or a SecAgg+
    round halted for lack of nodes). Starting Ray here turns that into a retry, then one clear
    error with Ray's reason. The backend's own ``ray.shutdown`` still ends the session after
    the run, except inside :func:`ray_session`, which ends it when the session closes. The
    PYTHONPATH handling mirrors ``RayBackend.init_ray``.
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


# ---- one Ray instance, and warm actors, for consecutive federations ---------------------------
#
# Flower's Ray backend ends every run with ``pool.terminate_all_actors()`` and ``ray.shutdown()``
# (flwr/server/superlink/fleet/vce/backend/raybackend.py, RayBackend.terminate), and the Simulation
# Engine always builds that class (vce_api.start_vce's backend_fn); Flower has no option to keep
# either. So each federation paid a fresh Ray head and fresh actor processes that re-import torch,
# transformers and peft. Ray's own mechanisms don't help here: a driver that joins a running head
# keeps the head, but not its workers (they belong to the job, and Flower's actors are not detached).
# Inside ray_session the backend is a subclass whose build() takes the previous run's actor pool
# and whose terminate() hands the pool back to the session instead (see _session_backend).

REUSE_TESTED_FLWR = "1.42.0"  # the Flower release whose backend internals _session_backend relies on
ACTOR_PING_TIMEOUT_S = 60.0  # an idle actor answers at once; one that doesn't is replaced


class RaySession:
    """What :func:`ray_session` keeps between federations, in the driver process."""

    def __init__(self) -> None:
        self.init_args: dict | None = None  # what Ray was started (or joined) with in this session
        self.pool = None  # the actor pool (flwr BasicActorPool) the last clean run left, warm
        self.pool_key = ""  # the client resources and actor arguments that pool was built for
        self.pending: tuple | None = None  # (pool, key) from the backend; kept if the run ends cleanly
        self.runs = 0  # federations run in this session
        self.reused = 0  # of which ran on the previous run's actors
        self.actor_ids: list[str] = []  # the last run's actors (hex ids, sorted)

    def take_pool(self, key: str):  # noqa: ANN201 - flwr's BasicActorPool or None
        """The warm pool for a run whose backend wants ``key``, or None (then build a fresh one)."""
        pool, self.pool = self.pool, None
        if pool is None:
            return None
        if key != self.pool_key or not _pool_is_warm(pool):
            _kill_pool(pool)
            return None
        return pool

    def keep(self) -> None:
        """The run ended cleanly: its pool serves the next run."""
        if self.pending is not None:
            _kill_pool(self.pool)  # (none: take_pool emptied it)
            (self.pool, self.pool_key), self.pending = self.pending, None

    def discard(self) -> None:
        """Kill every kept actor and end Ray: the next run (if any) starts afresh, as without a session."""
        import ray

        for pool in (self.pool, self.pending[0] if self.pending else None):
            _kill_pool(pool)
        self.pool, self.pending = None, None
        if ray.is_initialized():
            ray.shutdown()

    def use(self, init_args: dict) -> None:
        """Before a run with Ray ``init_args``: Ray started otherwise (or gone) is not reused."""
        import ray

        if not ray.is_initialized():
            self.pool, self.pending = None, None  # its Ray is gone, and with it every actor handle
        elif self.init_args is not None and self.init_args != init_args:
            self.discard()
        self.init_args = dict(init_args)


_SESSION: RaySession | None = None


@contextlib.contextmanager
def ray_session() -> Iterator[RaySession]:
    """Run every :func:`run_on_simulation_engine` inside on one Ray instance and warm actors.

    The first federation starts (or, with ``runtime.ray_address``, joins) Ray as before; at its
    end the ClientApp actors and Ray stay up, and the next federation runs on the same actors when
    they still fit its client resources and the cluster and every one answers (else on fresh ones).
    Per-client state is on disk; each actor forgets what a previous run left in its process (every
    ``functools`` cache of fedpref's modules: the runtimes with their attached safety modules,
    users, configs, trust roots, text caches) before its first message of a new run, so a reused
    actor starts each run as a fresh process would, only with its imports done. A run that fails
    ends Ray as before. Leaving the session (normally, on an error or on Ctrl-C) kills the actors
    and calls ``ray.shutdown()`` (which, for a joined cluster, only disconnects). Nested sessions
    are the outer one. Relies on flwr's RayBackend internals: flwr ``REUSE_TESTED_FLWR`` only.
    """
    global _SESSION
    if _SESSION is not None:
        yield _SESSION
        return
    check_flower_for_reuse()
    session = _SESSION = RaySession()
    try:
        yield session
    finally:
        _SESSION = None
        if session.init_args is not None:  # a federation ran: Ray is the session's to end
            session.discard()


def check_flower_for_reuse(version: str | None = None) -> None:
    """Fail closed on any Flower but the release :func:`_session_backend` was written against."""
    version = version or importlib.metadata.version("flwr")
    if version != REUSE_TESTED_FLWR:
        raise SimulationRuntimeError(
            f"flwr {version} is installed, but fedpref-sim keeps Ray and its actors between federations by "
            f"subclassing flwr {REUSE_TESTED_FLWR}'s RayBackend (simulations/engine.py, _session_backend); "
            f"install flwr=={REUSE_TESTED_FLWR} (the version pyproject.toml pins), or check _session_backend "
            "against the new flwr's raybackend.py and vce_api.py and update REUSE_TESTED_FLWR")


def _pool_key(client_resources: dict, actor_kwargs: dict) -> str:
    return repr((sorted(client_resources.items()), sorted((k, repr(v)) for k, v in actor_kwargs.items())))


def _pool_actors(pool) -> list:  # noqa: ANN001
    busy = [a for a in getattr(pool, "_future_to_actor", {}).values()]
    return list(pool.pool) + busy


def _pool_is_warm(pool) -> bool:  # noqa: ANN001
    """Every actor idle and answering, and the cluster still sized for exactly this many."""
    import ray
    from flwr.simulation.ray_transport.ray_actor import pool_size_from_resources

    try:
        if getattr(pool, "_future_to_actor", None) or len(pool.pool) != pool.num_actors or not pool.pool:
            return False
        if pool_size_from_resources(pool.client_resources) != pool.num_actors:
            log.info("the Ray cluster changed: fresh ClientApp actors for this run")
            return False
        ray.get([a.__ray_ready__.remote() for a in pool.pool], timeout=ACTOR_PING_TIMEOUT_S)
        return True
    except Exception as e:  # noqa: BLE001 - a dead, hung or unreachable actor: build a fresh pool
        log.info("the previous run's actors are not reusable (%s: %s): fresh ones for this run", type(e).__name__, e)
        return False


def _kill_pool(pool) -> None:  # noqa: ANN001
    if pool is None:
        return
    import ray

    for actor in _pool_actors(pool):
        with contextlib.suppress(Exception):  # already dead, or Ray already down
            ray.kill(actor, no_restart=True)


_BACKENDS: dict[type, type] = {}


def _session_backend_class(base: type) -> type:
    """Flower's ``RayBackend`` (``base``) whose actors outlive the run, for :func:`ray_session`."""
    if base not in _BACKENDS:

        class SessionRayBackend(base):  # type: ignore[misc, valid-type]
            """``build`` takes the warm pool the session's previous run left (when it fits this
            run and every actor answers) or builds one as Flower does; ``terminate`` hands the pool
            to the session instead of terminating the actors and calling ``ray.shutdown()``."""

            fedpref_session = True

            def build(self, app_fn) -> None:  # noqa: ANN001
                session, key = _SESSION, _pool_key(self.client_resources, self.actor_kwargs)
                pool = session.take_pool(key) if session is not None else None
                if pool is None:
                    super().build(app_fn)
                else:
                    self.pool, self.app_fn = pool, app_fn
                    session.reused += 1
                if session is not None and self.pool is not None:
                    session.actor_ids = sorted(a._actor_id.hex() for a in self.pool.pool)  # as Flower's pool does

            def terminate(self) -> None:
                session = _SESSION
                if session is None or self.pool is None:
                    super().terminate()
                    return
                session.pending = (self.pool, _pool_key(self.client_resources, self.actor_kwargs))
                self.pool = None

        _BACKENDS[base] = SessionRayBackend
    return _BACKENDS[base]


@contextlib.contextmanager
def _session_backend() -> Iterator[None]:
    """Have the Simulation Engine build :func:`_session_backend_class` for the run inside.

    A narrow monkeypatch of Flower, for want of any other hook: ``vce_api.start_vce`` imports
    ``RayBackend`` from ``flwr.server.superlink.fleet.vce.backend.raybackend`` when it starts the
    backend, so that module attribute is swapped for our subclass for the duration of one run,
    and restored after. Checked against flwr ``REUSE_TESTED_FLWR`` (:func:`check_flower_for_reuse`).
    """
    from flwr.server.superlink.fleet.vce.backend import raybackend

    check_flower_for_reuse()
    original = raybackend.RayBackend
    if getattr(original, "fedpref_session", False):  # already swapped (a nested run)
        yield
        return
    raybackend.RayBackend = _session_backend_class(original)
    try:
        yield
    finally:
        raybackend.RayBackend = original


# -- in each ClientApp actor ----------------------------------------------------------------------
_WORKER_RUN: str | None = None  # the run whose state this process's caches hold


def enter_run(token: str) -> list[str]:
    """In a ClientApp process, before each message: on a new run's first message, clear what a
    previous run left in this process's memory. Returns the caches cleared (for tests)."""
    global _WORKER_RUN
    if _WORKER_RUN == token:
        return []
    cleared = clear_fedpref_caches() if _WORKER_RUN is not None else []
    _WORKER_RUN = token
    return cleared


def clear_fedpref_caches() -> list[str]:
    """Empty every ``functools`` cache defined in a loaded fedpref module: ``get_runtime``'s
    runtimes (model, attached safety module, snapshot), the ClientApp's users, model configs,
    trust roots and text caches, and any cache added later, whatever it is keyed by."""
    import gc

    cleared = []
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "fedpref" or name.startswith("fedpref.")):
            continue
        for attr, obj in list(vars(module).items()):
            if callable(getattr(obj, "cache_clear", None)) and getattr(obj, "__module__", None) == name:
                obj.cache_clear()
                cleared.append(f"{name}.{attr}")
    gc.collect()  # the previous run's models, now unreferenced, go before this run builds its own
    return cleared


def _fresh_state_per_run(app, token: str) -> None:  # noqa: ANN001 - flwr ClientApp
    """Register (Flower's public ``ClientApp.lifespan``) :func:`enter_run` around every message."""
    previous = getattr(app, "_lifespan", None)  # any lifespan the app already has still runs, inside

    @app.lifespan()
    def _lifespan(context):  # noqa: ANN001, ANN202
        enter_run(token)
        if previous is None:
            yield
        else:
            with previous(context):
                yield


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
        "population": num_users,  # the server waits for every virtual device before it samples
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
    session = _SESSION
    if session is not None:
        session.use(init_args)
    start_ray(init_args)
    client_app = make_client_app(settings, devices=devices)
    if session is not None:  # its actors may have served a previous run
        _fresh_state_per_run(client_app, uuid.uuid4().hex)

    def run() -> None:
        from fedpref.server.app import make_server_app  # here, not at the top: see TYPE_CHECKING above

        with indexed_dispatch():  # Flower's dispatcher at one store scan a poll (simulations/dispatch.py)
            _run_simulation(
                num_supernodes=num_users,
                exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                client_app=client_app,
                server_app=make_server_app(settings),
                backend_name="ray",
                backend_config=backend_config,
                verbose_logging=verbose,
            )

    if session is None:
        run()  # Flower's backend ends Ray
        return
    session.runs += 1
    try:
        with _session_backend():
            run()
    except BaseException:
        session.discard()
        raise
    session.keep()
