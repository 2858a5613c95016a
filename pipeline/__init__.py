"""Pure ML and the knowledge store: no Kafka in here."""
