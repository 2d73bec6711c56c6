"""fedpref.protocol: the wire contract both sides import: the parameter partition, the
messages (with the ranges every received number must lie in), their SecAgg+ wire format, the
run config keys, and the agent's local API (agent.proto + generated stubs)."""
