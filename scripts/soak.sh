#!/usr/bin/env bash
# Soak a loopback deployment with faults (issue 12): a fedpref server (SuperLink + TLS + nginx)
# and N fedpref-agent devices on this machine; devices and the server are SIGKILLed at seeded
# random times and restarted; afterwards every store, accountant and the privacy ledger are
# checked. Not part of `make test`. Bounded by --minutes (default 15).
#
#   scripts/soak.sh [--agents 10] [--rounds 20] [--minutes 15] [--seed 0] [--workdir DIR] [--keep]
#   scripts/soak.sh --help        # every option (q, round timeout, kill intervals, ...)
#
# The last line is `soak: rounds=R devices=D kills=K lost=N ledger=consistent|inconsistent`;
# exit 0 only with the target rounds released, nothing lost and every ledger consistent.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$root/.venv/bin/python"
if [[ ! -x "$py" ]]; then
    echo "soak: $py not found; run \`make install\` first" >&2
    exit 2
fi
export PATH="$root/.venv/bin:$PATH:/usr/sbin:/usr/local/sbin"   # fedpref-*, flwr, nginx
exec "$py" "$root/scripts/soak.py" "$@"
