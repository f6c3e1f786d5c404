"""Who is admitted at the handshake: a site that accepted the request, proved its identity,
is the only node speaking for its site id, did not rewind its ledger, computed the
coordinator's spend and stays within the federation's budget policy (run config
``max-total-epsilon``: the most any site may have spent, across runs, once this run is
charged).

Identity: with a site registry (run config ``site-registry``) a site is admitted only if
its handshake reply is signed, with the key registered for the site id it claims, over this
run's nonce, the run id, that site id and its node id (:mod:`fediim.protocol.identity`); an
impostor is refused and the genuine site is not affected, whichever answers first. Without
a registry site ids are unverified claims, and when two nodes claim one id the later
claimant is refused (the reply pulled later; of replies pulled together, the higher node id)
and logged. The earlier one may be the impostor: configure a registry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.spend import SpendRecord
from fediim.errors import SignatureError
from fediim.protocol.identity import SiteRegistry, verify_handshake
from fediim.protocol.messages import HandshakeReply

__all__ = ["Admission", "Problem"]

#: Why a site is not admitted: a fixed code for federation.json and a reason for people.
Problem = tuple[str, str]


@dataclass
class Admission:
    """One run's handshake checks; :attr:`admitted` maps each admitted site id to its node."""

    run_id: int
    nonce: str
    rho: float
    registry: SiteRegistry | None
    spend: SpendRecord
    admitted: dict[str, int] = field(default_factory=dict)
    #: The federation's budget policy: most rho a site may have spent, this run included
    #: (inf: no policy).
    max_total_rho: float = math.inf

    def judge(self, node_id: int, reply: HandshakeReply) -> Problem | None:
        """Why the site on ``node_id`` is not admitted, or None (then it is admitted)."""
        problem = (self._identity_problem(node_id, reply) or self._duplicate_problem(reply)
                   or self._spend_problem(reply)) if reply.ok else (str(reply.code),
                                                                     reply.reason)
        if problem is None:
            self.admitted[reply.site_id] = node_id
        return problem

    def _identity_problem(self, node_id: int, reply: HandshakeReply) -> Problem | None:
        if self.registry is None:
            return None
        public_key = self.registry.public_key(reply.site_id)
        if public_key is None:
            return ("unregistered_site", f"site id {reply.site_id!r} is not in the "
                    f"coordinator's site registry {Path(self.registry.source).name}")
        if not reply.site_signature:
            return ("bad_site_signature", "the handshake reply is not signed (the site's "
                    "configuration names no site_key)")
        try:
            verify_handshake(public_key, reply.site_signature, run_id=self.run_id,
                             nonce=self.nonce, site_id=reply.site_id, node_id=node_id)
        except SignatureError as exc:
            return "bad_site_signature", str(exc)
        return None

    def _duplicate_problem(self, reply: HandshakeReply) -> Problem | None:
        first = self.admitted.get(reply.site_id)
        if first is None:
            return None
        return ("duplicate_site_id", f"site id {reply.site_id!r} is already taken in this run "
                f"by node {first}, which answered first")

    def _spend_problem(self, reply: HandshakeReply) -> Problem | None:
        reported = reply.ledger.rho_spent if reply.ledger is not None else 0.0
        rewound = self.spend.rewind_reason(reply.site_id, reported)
        if rewound is not None:
            return "ledger_rewound", rewound
        if not math.isclose(reply.rho_requested, self.rho, rel_tol=1e-9):
            return ("plan_mismatch", f"the site computed rho={reply.rho_requested!r} for this "
                    f"request, the coordinator {self.rho!r}")
        return self._policy_problem(reply.site_id, reported)

    def _policy_problem(self, site_id: str, reported: float) -> Problem | None:
        """The federation's budget policy, on the larger of the site's reported spend and
        the last one this coordinator acknowledged."""
        last = self.spend.last(site_id)
        spent = max(reported, last.rho_spent_total if last is not None else 0.0)
        if spent + self.rho <= self.max_total_rho * (1 + 1e-12):
            return None
        return ("federation_budget", f"the site has spent rho={spent:.6g}; this run's "
                f"rho={self.rho:.6g} would pass the federation's policy of "
                f"rho={self.max_total_rho:.6g} in total")
