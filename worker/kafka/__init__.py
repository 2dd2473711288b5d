"""The only package that speaks to Kafka: the consumer, the dead-letter writer and readers, the
budget exchange."""
