"""purge-worker: Kafka content-change events in, coalesced, rate-limited Cloudflare purges out."""

__version__ = "0.1.0"
