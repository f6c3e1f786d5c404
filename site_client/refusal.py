"""A site's expected reasons to refuse a stage (internal to the site app)."""

from __future__ import annotations

from fediim.errors import BudgetExceeded, FediimError, LedgerError
from fediim.protocol.messages import LedgerView, ReplyCode

__all__ = ["Refusal", "spending_refusal"]


class Refusal(FediimError):
    """An expected reason to refuse a stage: :func:`site_client.site.handle` logs
    ``detail`` at the site and answers with ``code`` alone; it never leaves the site."""

    def __init__(self, code: ReplyCode, detail: str, ledger: LedgerView | None = None) -> None:
        super().__init__(detail)
        self.code, self.detail, self.ledger = code, detail, ledger


def spending_refusal(exc: BudgetExceeded | LedgerError, ledger: LedgerView | None) -> Refusal:
    """The refusal of a release the ledger stopped before anything was sent: over budget
    (``insufficient_budget``), or the ledger changed under it (``ledger_error``)."""
    if isinstance(exc, BudgetExceeded):
        return Refusal(ReplyCode.INSUFFICIENT_BUDGET, f"insufficient privacy budget: {exc}",
                       ledger)
    return Refusal(ReplyCode.LEDGER_ERROR, f"privacy ledger changed during the release; "
                   f"nothing was sent: {exc}", ledger)
