"""One module per ``purge-worker`` sub-command; ``worker.cli`` parses and dispatches."""
