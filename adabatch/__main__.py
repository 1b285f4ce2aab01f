"""``python -m adabatch``: the ``adabatch`` command, for launchers that take a module (``torchrun -m adabatch``)."""

import sys

from adabatch.cli import main

if __name__ == "__main__":  # importing the module (docstring tests) runs nothing
    sys.exit(main())
