"""``python -m examples.server``: see :mod:`examples.server.app`."""

import sys

from examples.server.app import main

sys.exit(main())
