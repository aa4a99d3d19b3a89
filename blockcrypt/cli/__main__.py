"""``python -m blockcrypt.cli``: the same as the ``blockcrypt`` command."""
import sys

from .main import main

sys.exit(main())
