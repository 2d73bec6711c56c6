"""The Flower run config both apps read: which TOML, which data, which method, where.

These are the keys of ``[tool.flwr.app.config]`` in pyproject.toml; ``flwr run . -c
'method="aggregated"'`` and ``fedpref-sim run`` both set them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from fedpref.common.errors import ConfigError
from fedpref.protocol.secagg import SECURE_AGGREGATION_KEY, parse_run_flag

# Relative paths in the run config are relative to the Flower App (this repository), not to
# the working folder of whichever Flower process runs the app.
APP_ROOT = Path(__file__).resolve().parents[1]


class Method(str, Enum):
    AGGREGATED = "aggregated"  # shared adapter + head only, FedAvg for everyone
    LOCAL = "local"  # private adapter only, no federation
    FINETUNED = "finetuned"  # aggregated, then local fine-tuning of a private adapter
    PERSONALIZED = "personalized"  # fedpref: shared and private together
    ORACLE = "oracle"  # the generator's true weights
    COUNT = "count"  # no model: the majority of the other users' choices on the same two texts

    @property
    def federated(self) -> bool:
        return self in (Method.AGGREGATED, Method.PERSONALIZED)

    @property
    def trains_private(self) -> bool:
        return self in (Method.LOCAL, Method.FINETUNED, Method.PERSONALIZED)


@dataclass(frozen=True)
class AppRun:
    config_file: str  # TOML with [model], [federation], [local]; "" = built-in defaults
    data: Path | None  # simulation: the preference JSONL every client reads its user's pairs from (None in deployment)
    workdir: Path  # server checkpoints, ledger, per-client state
    method: Method
    cache: str  # hidden-state cache built by the runner; "" = each client builds its own
    seed: int  # simulation only: the adapters' initial weights and, with deterministic_noise, every DP draw
    policy: Path | None = None  # signed safety-policy envelope the server distributes (None = none)
    root: Path | None = None  # the trust root (root.json) server and devices verify it with
    secure_aggregation: bool = False  # Flower SecAgg+: the server learns only the sum of the deltas
    deterministic_noise: bool = False  # simulation only: DP draws seeded per (seed, user, round), so runs repeat;
    # refused by `fedpref-server start`, and a deployed device declines a round that asks for it
    rounds: int = 0  # total rounds for this workdir, overriding [federation] rounds (0 = the config's)
    attribute_basis: str = ""  # overrides [model.adapter] attribute_basis on server and simulated devices ("" = the config's)
    # simulation: how many virtual devices the engine registers; the server waits for all of them before it
    # samples, as Flower starts the ServerApp before it registers the nodes (0 = [federation] min_available_clients)
    population: int = 0

    @property
    def clients_dir(self) -> Path:
        return self.workdir / "clients"

    @property
    def server_dir(self) -> Path:
        return self.workdir / "server"


def from_run_config(rc: dict[str, Any], *, base: Path | None = None, run_id: int | None = None) -> AppRun:
    """Typed settings from a Flower run config.

    Relative paths are relative to the app (this repository). ``{run_id}`` in ``workdir`` is
    replaced by Flower's run id, so every ``flwr run`` gets its own ledger and checkpoints.
    """
    def get(key: str, default: Any) -> Any:
        return rc.get(key, default)

    base = base or APP_ROOT

    def path(v: str) -> Path:
        p = Path(v).expanduser()
        return p if p.is_absolute() else base / p

    try:
        method = Method(get("method", Method.PERSONALIZED.value))
    except ValueError:
        raise ConfigError(
            f"run config method = {get('method', '')!r}; use 'personalized' or 'aggregated'"
        ) from None
    if not method.federated:
        raise ConfigError(f"run config method = {method.value!r} is not federated; use 'personalized' or 'aggregated'")
    data = str(get("data", ""))
    if get("policy", "") and not get("root", ""):
        raise ConfigError("run config policy is set but root is empty; give the root.json that verifies it")
    return AppRun(
        config_file=str(get("config", "")),
        data=path(data) if data else None,
        workdir=path(str(get("workdir", "results/flwr")).replace("{run_id}", str(run_id if run_id is not None else 0))),
        method=method,
        cache=str(get("cache", "")),
        seed=int(get("seed", 0)),
        policy=path(str(get("policy", ""))) if get("policy", "") else None,
        root=path(str(get("root", ""))) if get("root", "") else None,
        secure_aggregation=parse_run_flag(get(SECURE_AGGREGATION_KEY, False)),
        deterministic_noise=parse_run_flag(get("deterministic-noise", False), key="deterministic-noise"),
        rounds=_non_negative_int(get("rounds", 0), "rounds"),
        attribute_basis=str(path(str(get("attribute-basis", "")))) if get("attribute-basis", "") else "",
        population=_non_negative_int(get("population", 0), "population"),
    )


def _non_negative_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"run config {key} = {value!r}; use an integer >= 0 (0 = the config file's value)")
    return value
