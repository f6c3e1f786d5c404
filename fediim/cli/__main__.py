"""``python -m fediim.cli``: the ``fediim`` command."""

import sys

from fediim.cli.command import main

sys.exit(main())
