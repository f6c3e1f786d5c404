"""The ``fediim`` command: one module per subcommand, assembled in :mod:`fediim.cli.command`."""

from fediim.cli.command import SUBCOMMANDS, build_parser, main

__all__ = ["SUBCOMMANDS", "build_parser", "main"]
