"""A device's own terms: the least privacy it accepts, whatever a round asks.

The server's round config says how to train (σ, clip, budget); a device that took those
values on trust would train at whatever σ a curious server asked for. So each device holds
its own floor, set on the device (``fedpref-agent init``, the ``[terms]`` table of its
``agent.toml``; in simulation, the researcher's settings) and never changed by a round:

* the least DP-SGD noise multiplier σ it trains with (> 0: there is no non-DP round);
* the largest per-sample clip it accepts;
* its own ε_sample budget, at its own δ, over every round it ever trains;
* whether it reports training metrics in clear at all.

A round that asks for less is declined with the rule it broke (never the device's own numbers:
a server must not learn a device's data size or floors from the text), which the operator
sees in ``fedpref-server status``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from fedpref.protocol.errors import ConfigError, DeclinedRound
from fedpref.protocol.messages import RoundConfig

log = logging.getLogger("fedpref.client")


@dataclass(frozen=True)
class DeviceTerms:
    min_noise_multiplier: float = 1.0  # σ: the least DP-SGD noise this device trains with (> 0)
    max_grad_norm: float = 1.0  # the largest DP-SGD per-sample clip it accepts (L2)
    max_epsilon_sample: float = 10.0  # its own ε_sample budget over all rounds, at `delta` (inf = none)
    delta: float = 1e-5  # δ of its ε_sample
    share_metrics: bool = False  # report training metrics (loss, accuracy, ε_sample, time) in clear when asked

    def __post_init__(self) -> None:
        def bad(key: str, value: object, rule: str, fix: str) -> ConfigError:
            return ConfigError(f"terms.{key} = {value!r}; {rule} ({fix})")

        if not (math.isfinite(self.min_noise_multiplier) and 0 < self.min_noise_multiplier <= 1e6):
            raise bad("min_noise_multiplier", self.min_noise_multiplier, "use a finite σ in (0, 1e6]",
                      "a device never trains without DP-SGD noise; e.g. 1.0")
        if not (math.isfinite(self.max_grad_norm) and 0 < self.max_grad_norm <= 1e6):
            raise bad("max_grad_norm", self.max_grad_norm, "use a finite clip in (0, 1e6]", "e.g. 1.0")
        if math.isnan(self.max_epsilon_sample) or not self.max_epsilon_sample > 0:
            raise bad("max_epsilon_sample", self.max_epsilon_sample, "use a number > 0 or inf", "e.g. 10")
        if not (math.isfinite(self.delta) and 0 < self.delta < 1):
            raise bad("delta", self.delta, "use a probability in (0, 1)", "e.g. 1e-5")

    def check(self, cfg: RoundConfig) -> None:
        """Decline a round that asks for less privacy than these terms allow. The reason names
        the rule, never the device's own numbers (the details go to the device's log only)."""
        if cfg.dp_noise_multiplier < self.min_noise_multiplier:
            log.info("declining: σ %g < floor %g", cfg.dp_noise_multiplier, self.min_noise_multiplier)
            raise DeclinedRound("device terms: the round's DP-SGD noise multiplier is below this device's floor")
        if cfg.dp_max_grad_norm > self.max_grad_norm:
            log.info("declining: clip %g > ceiling %g", cfg.dp_max_grad_norm, self.max_grad_norm)
            raise DeclinedRound("device terms: the round's per-sample clip is above this device's ceiling")

    def budget(self, cfg: RoundConfig) -> float:
        """The tighter of the device's own ε_sample budget and the server's cap."""
        return min(self.max_epsilon_sample, cfg.max_epsilon_sample)

    def shares_metrics(self, cfg: RoundConfig) -> bool:
        return self.share_metrics and cfg.report_metrics


__all__ = ["DeviceTerms"]
