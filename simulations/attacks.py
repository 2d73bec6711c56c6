"""Attack experiments: code paths only a simulation or a test can reach.

Nothing here is reachable from a run config or a deployed app's settings: a deployed
ServerApp is ``fedpref.server.app:app`` and a deployed ClientApp trains under its agent
home's own terms. The experiments build their apps here, in Python.
"""

from __future__ import annotations

import json

from fedpref.server.app import make_server_app


def tampered_envelope(envelope: bytes) -> bytes:
    """The envelope with every signature's first character changed: devices must refuse it."""
    env = json.loads(envelope)
    for s in env["signatures"]:
        s["sig"] = ("B" if s["sig"][0] == "A" else "A") + s["sig"][1:]
    return json.dumps(env).encode()


# A compromised distribution path: the server sends a corrupted envelope (tests/test_deployment.py
# submits it with `fedpref.server.deploy.start(..., serverapp="fedpref.simulations.attacks:tampering_server_app")`).
tampering_server_app = make_server_app(envelope_transform=tampered_envelope)

__all__ = ["tampered_envelope", "tampering_server_app"]
