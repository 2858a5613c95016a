"""Contracts at the pipeline's boundaries: Kafka messages and configuration (pydantic v2)."""
