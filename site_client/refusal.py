"""A site's expected reasons to refuse a stage (internal to the site app)."""

from __future__ import annotations

from fediim.errors import FediimError
from fediim.protocol.messages import LedgerView, ReplyCode

__all__ = ["Refusal"]


class Refusal(FediimError):
    """An expected reason to refuse a stage: :func:`site_client.site.handle` logs
    ``detail`` at the site and answers with ``code`` alone; it never leaves the site."""

    def __init__(self, code: ReplyCode, detail: str, ledger: LedgerView | None = None) -> None:
        super().__init__(detail)
        self.code, self.detail, self.ledger = code, detail, ledger
