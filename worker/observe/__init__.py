"""Watching the worker: metrics, logs, probes, and command output, all redacted."""
