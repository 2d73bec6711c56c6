"""Flower's records are printed once, by Flower's own handler, not again through the root
handler that Opacus' logging.basicConfig installs (SecAgg+ printed ~3,000 DEBUG lines per demo)."""

import subprocess
import sys

PROG = """
import logging
import opacus  # logging.basicConfig: a root handler of no level
import fedpref.client.app  # noqa: F401  (what every ClientApp process imports)
from flwr.common.logger import log
log(logging.DEBUG, "stage-debug-marker")
log(logging.WARNING, "stage-warning-marker")
"""


def test_flower_debug_is_not_printed_through_opacus_root_handler():
    out = subprocess.run([sys.executable, "-c", PROG], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout + out.stderr
    assert "stage-debug-marker" not in text
    assert text.count("stage-warning-marker") == 1  # Flower's own handler, once


def test_without_the_fix_opacus_would_print_it():  # the test above can fail
    prog = PROG.replace("import fedpref.client.app  # noqa: F401  (what every ClientApp process imports)", "")
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "stage-debug-marker" in out.stdout + out.stderr
