"""The configuration: the file's model (``model``), reading it (``load``), and the settings the
worker runs with (``settings``)."""
