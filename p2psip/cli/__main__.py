"""``python -m p2psip.cli``: the same as the ``p2psip`` command."""

import sys

from p2psip.cli.parser import main

sys.exit(main())
