"""``python -m publisher`` is the ``hotreload`` command."""

import sys

from publisher.cli import main

sys.exit(main())
