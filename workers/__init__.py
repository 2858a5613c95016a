"""Kafka-facing processes, the local stack and the CLI: no ML in here."""
