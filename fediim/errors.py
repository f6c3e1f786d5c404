"""Every error fediim raises on purpose, under one base, and the command line's exit codes.

Catch :class:`FediimError` to handle any expected failure (bad input, a refused release,
an untrusted file); anything else is a bug. Each subclass carries a message that names
what was wrong and where (file, row, column or key). :class:`ExitCode` is the one table
of exit codes for every ``fediim`` subcommand; an error class states its own code, so a
command maps an exception to an exit code without reading its message.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

__all__ = [
    "BankError",
    "BudgetExceeded",
    "ConfigError",
    "DataError",
    "DeployError",
    "ExitCode",
    "FediimError",
    "LedgerError",
    "MessageError",
    "QuorumNotMet",
    "RunNotCompleted",
    "SchemaError",
    "SignatureError",
    "SigningKeyError",
    "SimulationUnavailable",
    "SiteConfigError",
    "StudyConfigError",
]


class ExitCode(IntEnum):
    """Exit codes of every ``fediim`` subcommand."""

    OK = 0
    #: The job ran but failed: an output could not be written, a study cell failed,
    #: a federated run did not complete.
    FAILED = 1
    #: Bad usage or bad input: nothing was run and nothing was written.
    USAGE = 2
    #: Interrupted (Ctrl-C); every process that was started has been stopped.
    INTERRUPTED = 130


class FediimError(Exception):
    """Base of every error fediim raises on purpose."""

    #: The exit code a command returns when this error stops it.
    exit_code: ExitCode = ExitCode.USAGE


class DataError(FediimError, ValueError):
    """Bad input data; the message names source, row and column, and what was expected.

    Attributes: ``source`` (file name or ``"<array>"``), ``row`` (1-based: the CSV line
    number with the header as line 1, or the array row counted from 1; None if not
    row-specific) and ``column`` (name, or None).
    """

    def __init__(
        self,
        source: str,
        expected: str,
        *,
        row: int | None = None,
        column: str | None = None,
        row_desc: str | None = None,
    ) -> None:
        self.source = source
        self.row = row
        self.column = column
        self.expected = expected
        self.row_desc = row_desc
        where = [source]
        if row is not None:
            where.append(row_desc or f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(", ".join(where) + ": " + expected)


    def at(self, source: str) -> DataError:
        """The same error, located in ``source`` (e.g. which site's table)."""
        return DataError(source, self.expected, row=self.row, column=self.column,
                         row_desc=self.row_desc)


class SchemaError(FediimError, ValueError):
    """A schema is invalid; the message names the source, the key and what was expected."""


class ConfigError(FediimError, ValueError):
    """An invalid federation run configuration; the message names the key."""


class SiteConfigError(FediimError, ValueError):
    """The site TOML is missing, unreadable or invalid; the message names file and key."""


class StudyConfigError(FediimError, ValueError):
    """A study file is invalid; the message names the file and the key."""


class BudgetExceeded(FediimError, RuntimeError):
    """A release would push a site's spent ρ past its budget; nothing was recorded or sent."""

    exit_code = ExitCode.FAILED


class LedgerError(FediimError, RuntimeError):
    """A ledger file is corrupt, tampered with, inconsistent, or belongs to another site."""


class BankError(FediimError, ValueError):
    """A bank file that cannot be trusted or read."""


class SigningKeyError(FediimError, ValueError):
    """A key file that is missing, unreadable or not an Ed25519 key."""


class SignatureError(FediimError, ValueError):
    """A bank signature that does not verify (tampered bank, wrong key, other run/schema)."""


class MessageError(FediimError, ValueError):
    """A record that is not a valid fediim message (wrong protocol, stage or fields)."""


class QuorumNotMet(FediimError, RuntimeError):
    """Fewer than ``min-sites`` sites are still in the run after a stage."""

    exit_code = ExitCode.FAILED


class DeployError(FediimError, RuntimeError):
    """The deployment could not be started, or the run did not complete."""

    exit_code = ExitCode.FAILED


class RunNotCompleted(DeployError):
    """A deployed run ended, but not as completed. ``federation`` is what is known of it:
    the coordinator's federation view (every site's stages and reasons), if it was written,
    and the deployment's own record under ``"deploy"``."""

    def __init__(self, message: str, federation: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.federation: dict[str, Any] = federation or {}


class SimulationUnavailable(DeployError):
    """Flower's Simulation Engine needs Ray, which is not installed (``fediim[sim]``)."""

    exit_code = ExitCode.USAGE
