"""The ``p2psip`` command.

Sub-commands are added as the layers they need exist; see docs/cli.md. Usage errors print one line and
exit 2, runtime failures exit 1, so scripts can tell a typo from a network problem.

One module per command family: :mod:`~p2psip.cli.parser` (the parser and :func:`main`),
:mod:`~p2psip.cli.peer` (start, status, lookup), :mod:`~p2psip.cli.call` (register, call),
:mod:`~p2psip.cli.proxy`, :mod:`~p2psip.cli.demo`; :mod:`~p2psip.cli.common` holds what they share.
"""

from __future__ import annotations

from p2psip.cli.parser import UsageError, build_parser, main

__all__ = ["UsageError", "build_parser", "main"]
