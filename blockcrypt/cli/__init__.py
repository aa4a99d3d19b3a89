"""The command line: the only package that imports click.

- ``main``     the group, disk/platform-key/catalog/des/config commands, the error boundary
- ``mount``    mount, umount, status
- ``vault``    the vault group
- ``options``  ``--json``, output and the state handle, declared once

Caveat: a front end: policy lives in control/, mount/ and vault/.
"""
from .main import cli, main  # noqa: F401
