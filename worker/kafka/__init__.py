"""The only package that speaks to Kafka: the consumer, the dead-letter writer and readers, the
budget exchange."""

from worker.kafka.repairs import close_failed_connects, stop_failed_starts

close_failed_connects()
stop_failed_starts()
