"""Targets waiting to be sent: what covers what, the pending set (the coalescer), and the purge
ledger."""
