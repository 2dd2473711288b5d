"""The loop's own histogram reads as prometheus_client's does: the same buckets, count and sum
for the same values, so the alerts and dashboards built on it hold."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from worker.observe.metrics import StepHistogram

BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600)


def exposed(registry: CollectorRegistry) -> list[str]:
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if "_created" not in line]


def test_a_steps_values_read_as_prometheus_clients_histogram_of_them():
    rng = random.Random(7)
    steps = [
        [rng.choice([0.0, 0.5, 1.0, 2.5, 3600.0, 5000.0, rng.uniform(0, 4000)])] * rng.randint(1, 3)
        for _ in range(200)
    ]
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    step = StepHistogram("age_seconds", "Age", BUCKETS, ours)
    reference = Histogram("age_seconds", "Age", buckets=BUCKETS, registry=theirs)
    for values in steps:
        step.observe_all(values)
        for value in values:
            reference.observe(value)
    assert exposed(ours) == exposed(theirs)
    assert 'age_seconds_bucket{le="1.0"}' in "\n".join(exposed(ours))  # a bound counts itself


def test_a_negative_age_from_a_skewed_clock_counts_as_zero():
    registry = CollectorRegistry()
    step = StepHistogram("age_seconds", "Age", BUCKETS, registry)
    step.observe_all([-3.0, 0.2])
    lines = exposed(registry)
    assert 'age_seconds_bucket{le="0.5"} 2.0' in lines
    assert "age_seconds_sum 0.2" in lines
