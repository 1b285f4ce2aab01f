"""``python -m adabatch``: the ``adabatch`` command, for launchers that take a module (``torchrun -m adabatch``)."""

import sys

from adabatch.cli import main

sys.exit(main())
