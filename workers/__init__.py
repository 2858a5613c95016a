"""The processes that run on a line: inference, control and monitor workers, their Kafka I/O, liveness,
metrics and security, and the `inspection` CLI. No ML in here (that is pipeline/), no developer tooling
(that is tools/)."""
