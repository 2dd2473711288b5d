"""``python -m worker`` is the same as the ``purge-worker`` command."""

import sys

from worker.cli import main

sys.exit(main())
