"""What every command shares: ``--json``, output, the state directory handle.

Caveat: only cli/ imports click.
"""
from __future__ import annotations

import json

import click

json_opt = click.option("--json", "as_json", is_flag=True, help="machine-readable output")


def emit(obj, as_json: bool, text: str | None = None) -> None:
    if as_json:
        click.echo(json.dumps(obj, indent=2, sort_keys=True))
    elif text is not None:
        click.echo(text)


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
