"""Server-side configuration: the federation and the local training it asks of devices.

Each numeric field declares its valid range with ``ranged(...)`` (see
:mod:`fedpref.common.tomlconfig`); ``check_fields`` enforces it, from TOML or from Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from fedpref.common.errors import ConfigError
from fedpref.common.tomlconfig import check_fields, ranged

MAX_ROUNDS = 100_000  # far beyond any budget; bounds the accountant's step count
MAX_CLIENTS = 10_000_000


@dataclass(frozen=True)
class FederationConfig:
    rounds: int = ranged(10, ge=1, le=MAX_ROUNDS)
    # q: each client joins a round independently with this probability
    client_sample_rate: float = ranged(0.5, gt=0, le=1)
    # wait for this many connected nodes before sampling
    min_available_clients: int = ranged(2, ge=1, le=MAX_CLIENTS)
    clip_norm: float = ranged(1.0, gt=0)  # C: L2 bound on each client's shared delta
    # z > 0: Gaussian noise std on the mean is z·C/E[m]
    server_noise_multiplier: float = ranged(1.0, gt=0, note="(user-level DP needs noise)")
    server_learning_rate: float = ranged(1.0, gt=0)  # global += lr · noisy mean delta
    delta: float = ranged(1e-5, gt=0, lt=1)  # δ for ε_user and ε_sample
    # stop before a round would exceed this ε_user; inf = no budget
    max_epsilon_user: float = ranged(math.inf, gt=0, inf=True, example=10.0)
    round_timeout_s: float = ranged(3600.0, gt=0, le=30 * 86400.0)  # seconds to wait for replies (≤ 30 days)
    report_eval_metrics: bool = True  # clients report held-out accuracy (not covered by DP; off in deployment)

    def __post_init__(self) -> None:
        check_fields(self, "federation")


@dataclass(frozen=True)
class LocalConfig:
    """Local DP-SGD settings, sent to every device in each round's config."""

    epochs: int = ranged(1, ge=1, le=1000)  # passes over the user's train pairs per round
    batch_size: int = ranged(16, ge=1, le=65_536)  # expected Poisson batch, pairs
    learning_rate: float = ranged(0.05, gt=0)  # LoRA matrices
    head_learning_rate: float = ranged(0.5, gt=0)  # reward heads (score, personal_head)
    projection_learning_rate: float = ranged(0.05, gt=0)  # the shared style projection
    dp_noise_multiplier: float = ranged(1.0, ge=0, note="(0 turns sample-level DP off)")  # σ of DP-SGD
    dp_max_grad_norm: float = ranged(1.0, gt=0)  # per-sample clip (L2)
    # a device declines a round that would exceed this ε_sample; inf = no budget
    max_epsilon_sample: float = ranged(math.inf, gt=0, inf=True, example=10.0)

    def __post_init__(self) -> None:
        check_fields(self, "local")


@dataclass(frozen=True)
class PersonalizeConfig:
    """``[personalize]``: after the last round of a personalized run, every connected device
    fits its private adapter on the released global model (private-only DP-SGD on the device,
    charged to its own ε_sample; nothing it fits is sent back, so ε_user is unchanged).

    The rounds train the shared model; one per-sample clip is split there between the shared and
    the private gradients, and a device sampled at ``q`` trains its private head about ``q · rounds``
    epochs in all. This step gives every device a head fitted to the model it will rank with.
    """

    epochs: int = ranged(0, ge=0, le=1000, example=5, note="(0 = no final personalization)")  # DP-SGD epochs
    learning_rate: float = ranged(0.0, ge=0, le=1e4, note="(0 = [local].learning_rate)")  # private LoRA step
    head_learning_rate: float = ranged(0.0, ge=0, le=1e4, example=0.05, note="(0 = [local].head_learning_rate)")
    # expected Poisson batch of the fit (pairs); the rounds may run full batches ([local].batch_size ≥ a
    # user's pairs: q = 1, one step per epoch), while a head fitted on its own wants many small steps
    batch_size: int = ranged(0, ge=0, le=65_536, example=16, note="(0 = [local].batch_size)")
    # whether a personalized run's rounds train the private adapter too ([model.adapter] objective); false: the
    # rounds train the shared part alone, as FedAvg does, and the private adapter is fitted only in this step
    rounds_train_private: bool = True

    def __post_init__(self) -> None:
        check_fields(self, "personalize")
        if not self.rounds_train_private and self.epochs == 0:
            raise ConfigError("rounds_train_private = false with epochs = 0 would never train a private adapter; "
                              "set epochs (e.g. 5) or rounds_train_private = true")

    def local(self, local: LocalConfig) -> LocalConfig:
        """The [local] settings a personalize message carries: its epochs, steps and batch, [local]'s σ and clip."""
        return replace(local, epochs=self.epochs, learning_rate=self.learning_rate or local.learning_rate,
                       head_learning_rate=self.head_learning_rate or local.head_learning_rate,
                       batch_size=self.fit_batch_size(local))

    def fit_batch_size(self, local: LocalConfig) -> int:
        """The fit's expected batch: ``batch_size``, or the rounds' ([local]) where it is 0."""
        return self.batch_size or local.batch_size


def check_personalize_model(p: PersonalizeConfig, adapter, *, where: str) -> None:  # noqa: ANN001 (AdapterSpec)
    """[personalize] against [model.adapter]: a *learnt* style projection (``personal_dims > 0``
    and no ``attribute_basis``) is shared, and learns only from the private head's loss, so
    rounds that train the shared part alone would leave it at its random start for good."""
    if adapter.learnt_projection and not p.rounds_train_private:
        raise ConfigError(f"{where}: [personalize] rounds_train_private = false, but [model.adapter] learns its style "
                          "projection (personal_dims > 0, no attribute_basis), which only the private head's loss "
                          "trains; set rounds_train_private = true, or give an attribute_basis (README: the model)")
