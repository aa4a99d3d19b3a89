"""``python -m blockcrypt``: the same as the ``blockcrypt`` command."""
import sys

from .cli import main

sys.exit(main())
