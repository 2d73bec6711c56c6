"""Server-side configuration: the federation and the local training it asks of devices."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedpref.protocol.errors import ConfigError


@dataclass(frozen=True)
class FederationConfig:
    rounds: int = 10
    client_sample_rate: float = 0.5  # q: each client joins a round independently with this probability
    min_available_clients: int = 2  # wait for this many connected nodes before sampling
    clip_norm: float = 1.0  # C: L2 bound on each client's shared delta
    server_noise_multiplier: float = 1.0  # z > 0: Gaussian noise std on the mean is z·C/E[m]
    server_learning_rate: float = 1.0  # global += lr · noisy mean delta
    delta: float = 1e-5  # δ for ε_user and ε_sample
    max_epsilon_user: float = math.inf  # stop before a round would exceed this ε_user
    round_timeout_s: float = 3600.0  # how long to wait for replies
    report_eval_metrics: bool = True  # clients report held-out accuracy (not covered by DP; off in deployment)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"federation.rounds = {self.rounds}; use ≥ 1")
        if not 0 < self.client_sample_rate <= 1:
            raise ConfigError(f"federation.client_sample_rate = {self.client_sample_rate}; use a probability in (0, 1]")
        if self.clip_norm <= 0:
            raise ConfigError(f"federation.clip_norm = {self.clip_norm}; use a positive L2 bound, e.g. 1.0")
        if self.server_noise_multiplier <= 0:
            raise ConfigError(
                f"federation.server_noise_multiplier = {self.server_noise_multiplier}; user-level DP needs "
                "noise: use > 0 (e.g. 1.0)"
            )
        if not 0 < self.delta < 1:
            raise ConfigError(f"federation.delta = {self.delta}; use a probability in (0, 1), e.g. 1e-5")
        if self.min_available_clients < 1:
            raise ConfigError(f"federation.min_available_clients = {self.min_available_clients}; use ≥ 1")


@dataclass(frozen=True)
class LocalConfig:
    """Local DP-SGD settings, sent to every device in each round's config."""

    epochs: int = 1  # passes over the user's train pairs per round
    batch_size: int = 16  # expected Poisson batch, pairs
    learning_rate: float = 0.05  # LoRA matrices
    head_learning_rate: float = 0.5  # reward heads (score, personal_head)
    projection_learning_rate: float = 0.05  # the shared style projection
    dp_noise_multiplier: float = 1.0  # σ of DP-SGD; 0 turns sample-level DP off
    dp_max_grad_norm: float = 1.0  # per-sample clip
    max_epsilon_sample: float = math.inf  # a device declines a round that would exceed this

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"local.epochs = {self.epochs}; use ≥ 1")
        if self.batch_size < 1:
            raise ConfigError(f"local.batch_size = {self.batch_size}; use ≥ 1")
        if self.dp_noise_multiplier < 0:
            raise ConfigError(f"local.dp_noise_multiplier = {self.dp_noise_multiplier}; use ≥ 0 (0 = DP off)")
        if min(self.learning_rate, self.head_learning_rate, self.projection_learning_rate) <= 0:
            raise ConfigError("local.learning_rate, head_learning_rate and projection_learning_rate must be > 0")
