"""Records in: where they come from (the ``Source`` interface and its in-memory twin) and how
they become events."""
