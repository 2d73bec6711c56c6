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
from dataclasses import dataclass

from fedpref.common.errors import DeclinedRound
from fedpref.common.tomlconfig import check_fields, ranged
from fedpref.protocol.messages import RoundConfig

log = logging.getLogger("fedpref.client")


@dataclass(frozen=True)
class DeviceTerms:
    # σ: the least DP-SGD noise this device trains with (> 0: a device never trains without it)
    min_noise_multiplier: float = ranged(1.0, gt=0, le=1e6, note="(a device never trains without DP-SGD noise)")
    max_grad_norm: float = ranged(1.0, gt=0, le=1e6)  # the largest DP-SGD per-sample clip it accepts (L2)
    # its own ε_sample budget over all rounds, at `delta` (inf = none)
    max_epsilon_sample: float = ranged(10.0, gt=0, inf=True)
    delta: float = ranged(1e-5, gt=0, lt=1)  # δ of its ε_sample
    share_metrics: bool = False  # report training metrics (loss, accuracy, ε_sample, time) in clear when asked

    def __post_init__(self) -> None:
        check_fields(self, "terms")

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
