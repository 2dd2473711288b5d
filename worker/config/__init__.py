"""The configuration: the file's model, reading it, and the settings the worker runs with."""

from worker.config.load import load, parse
from worker.config.settings import AccountConfig, Config, KafkaSettings

__all__ = ["AccountConfig", "Config", "KafkaSettings", "load", "parse"]
