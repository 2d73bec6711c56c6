"""What a run costs: phases, the process tree's peak memory, and the federation's split."""

import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from fedpref.client.app import DEVICE_SECONDS_FILE, record_device_seconds
from fedpref.common.errors import ConfigError
from fedpref.simulations.config import RobustnessConfig, RuntimeConfig
from fedpref.simulations.cost import PeakRSS, Phases, tree_rss
from fedpref.simulations.report import cost_line
from fedpref.simulations.robustness import check_fractions
from fedpref.simulations.runner import cost_summary


def test_phases_add_up_and_other_is_the_rest():
    ph = Phases()
    for _ in range(3):
        with ph("a"):
            sum(range(10_000))
    with pytest.raises(RuntimeError), ph("b"):  # a failing phase still counts its time
        raise RuntimeError
    split = ph.split()
    assert set(split) == {"a", "b", "other"}
    assert all(v >= 0 for v in split.values())
    assert sum(split.values()) == pytest.approx(ph.elapsed(), abs=1e-3)


def test_peak_rss_counts_child_processes():
    """A child that holds 300 MB makes the tree's peak grow by about that much: Ray's workers are
    children too, and a figure of the driver alone would miss them."""
    alone = tree_rss(psutil.Process())
    code = "import sys, time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('ok', flush=True); time.sleep(30)"
    with PeakRSS(interval=0.05) as peak:
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "ok"  # the child holds its memory now
            peak.sample()
        finally:
            child.kill()
            child.wait()
    assert peak.peak - alone > 250 * 2**20
    assert peak.samples >= 2


def test_tree_rss_of_a_vanished_process_is_zero():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    proc = psutil.Process(child.pid)
    child.wait()
    assert tree_rss(proc) == 0


def test_cost_summary_splits_the_federation(tmp_path: Path):
    ph = Phases()
    ph.seconds.update({"federation": 10.0, "evaluation": 2.0})
    fed = tmp_path / "fed"
    for s in (1.0, 2.0, 3.0):  # three ClientApp calls
        record_device_seconds(fed, s)
    assert (fed / DEVICE_SECONDS_FILE).read_text().split() == ["1.000000", "2.000000", "3.000000"]
    peak = PeakRSS()
    out = cost_summary(ph, peak, [fed, tmp_path / "never-ran"], RuntimeConfig(client_cpus=1.0))
    actors = out["federation"]["actors"]
    assert out["federation"]["client_calls"] == 3 and out["federation"]["device_seconds"] == pytest.approx(6.0)
    assert out["phases"]["client_compute"] == pytest.approx(6.0 / actors)
    assert out["phases"]["client_compute"] + out["phases"]["flower_ray_overhead"] == pytest.approx(10.0)
    assert "federation" not in out["phases"] and out["peak_rss_bytes"] > 0
    line = cost_line({"cost": out})
    assert "peak RSS" in line and "Flower/Ray overhead" in line


def test_a_poisoning_fraction_must_leave_honest_users():
    check_fractions(RobustnessConfig(poison_fractions=(0.3,)), 40)
    with pytest.raises(ConfigError, match="no honest user"):
        check_fractions(RobustnessConfig(poison_fractions=(0.99,)), 40)  # round(39.6) = 40: all lie
    with pytest.raises(ConfigError, match="secure_aggregation_fractions"):
        check_fractions(RobustnessConfig(secure_aggregation_fractions=(0.5,)), 1)
