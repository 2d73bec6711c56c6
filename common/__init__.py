"""fedpref.common: what every layer uses and that is no part of the wire contract: errors and
exit codes, atomic writes, typed TOML config, the one JSONL reader, DP accounting, ``HOST:PORT``
addresses, and the processes the CLIs start (Flower's environment, process identity). It imports
no other fedpref package."""
