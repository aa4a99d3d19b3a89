"""What every command shares: ``--json``, ``--yes``, output (cli/output.py), the state directory handle.

Caveat: only cli/ imports click.
"""
from __future__ import annotations

import click

from .output import Progress, confirm, emit, out_file_opt, yes_opt  # noqa: F401  (the shared helpers)

json_opt = click.option("--json", "as_json", is_flag=True,
                        help="machine-readable output: one JSON document on stdout, errors as JSON on "
                             "stderr (docs/CLI.md)")


class Ctx:
    """The group's context object: the state directory, opened on first use."""

    def __init__(self, state_path):
        self.state_path = state_path
        self._state = None

    @property
    def state(self):
        if self._state is None:
            from ..control.state import State
            self._state = State.open(self.state_path)
        return self._state


pass_ctx = click.make_pass_decorator(Ctx)
