"""The coordinator's secure rounds: every statistic a sum over the admitted sites.

After the handshake of a secure run (run config ``aggregation``; see
:mod:`fediim.protocol.secure_run`) the coordinator drives the secure-sum protocol
(:mod:`fediim.protocol.secure_sum`) through the Grid: advertise keys (taken from the
handshake replies when the sites signed them for this run's threshold, else a round of
their own), share keys, then per statistic (clipping histograms if the plan clips, tree
counts, leaf Grams) one masked-input round, where each site computes its noised share
(charged to its ledger, and acknowledged with a spend receipt) and masks it, and one
unmask round. The first statistic needs no earlier sum, so its masked inputs ride with
key sharing; they are summed when every site that advertised keys shared them, else its
masked-input round follows as usual (the sites mask the same inputs again). Between sums
it post-processes the sum into the public state of the next
(:mod:`fediim.federated.secure_release`); the last sum becomes the bank, whose every cell
is a sum over sites.

A site that refuses, fails, answers malformed or stays silent in any secure round is
dropped for the rest of the run (recorded with its stage and reason); the run goes on
while at least ``t`` sites (and ``min-sites``) survive, else :class:`QuorumNotMet`. Each
round's survivors and each sum's survivors and dropped sites go to ``federation.json``
(``secure``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import numpy as np

from coordinator.federation import _Federation
from fediim.errors import BankError, MessageError, QuorumNotMet
from fediim.federated.bank import ModelBank
from fediim.federated.global_partition import GlobalTree
from fediim.federated.plan import PrivacyPlan
from fediim.federated.principal import Frame
from fediim.federated.secure_release import (
    SecureSettings,
    default_threshold,
    gram_share_sensitivity,
    summed_release,
)
from fediim.federated.vetting import release_problems
from fediim.protocol.messages import SecureReply, SecureRequest
from fediim.protocol.secure_run import (
    MAX_ABS_PER_SITE,
    PublicState,
    secure_limits,
    session_statistics,
)
from fediim.protocol.secure_sum import (
    CoordinatorSecureAggregator,
    KeyAdvertisement,
    MaskedInput,
    MaskedInputRequest,
    SecureAggregationError,
    SecureSumConfig,
    SecureSumMessage,
    ShareBundle,
    ShareDelivery,
    UnmaskReply,
)

__all__ = ["secure_bank"]

M = TypeVar("M", bound=SecureSumMessage)
#: A round's per-site extra request fields, by site id.
Extra = Callable[[str], dict[str, Any]]


class _SecureRounds:
    """One secure run's protocol state and the federation it drives."""

    def __init__(self, fed: _Federation) -> None:
        self.fed, self.plan = fed, fed.plan
        # histograms of the numeric columns only; coded ones keep their public coordinates
        self.clip, self.blocks = fed.columns.clip_columns, fed.columns.onehot_blocks
        self.statistics = session_statistics(self.plan, self.clip)
        sites = fed.active()
        ids = tuple(sorted(site.site_id for site in sites))
        threshold = fed.cfg.secure_threshold or default_threshold(len(ids))
        self.settings = SecureSettings(len(ids), threshold)
        self.config = SecureSumConfig(run_id=fed.run_id, sites=ids, threshold=threshold,
                                      vector_lengths=(None,) * len(self.statistics),
                                      max_abs_per_site=MAX_ABS_PER_SITE)
        self.protocol = CoordinatorSecureAggregator(self.config)
        self.node_of = {site.site_id: site.node_id for site in sites}
        fed.secure_info = {"sites": len(ids), "threshold": threshold, "site_ids": list(ids),
                           "statistics": list(self.statistics), "rounds": [],
                           "sessions": [], "columns": _columns_view(fed, self.plan)}

    # -- one round ------------------------------------------------------------------------
    def _request(self, site_id: str, step: str, extra: dict[str, Any]) -> Any:
        seed_index = self.config.sites.index(site_id) if self.fed.cfg.seed >= 0 else -1
        return SecureRequest(**self.fed.privacy_fields(), step=step,
                             sites=list(self.config.sites), threshold=self.config.threshold,
                             n_sessions=self.config.n_sessions, seed_index=seed_index,
                             **extra).to_record()

    def round(self, name: str, step: str, site_ids: Iterable[str], extra: Extra,
              timeout: float) -> dict[str, SecureReply]:
        """One secure round to the still active ``site_ids``: their replies (each with a
        protocol message) by site id; every other site is dropped, and quorum (t and
        min-sites) checked."""
        fed, stage = self.fed, f"secure:{name}"
        active = {site.site_id for site in fed.active()}
        requests = {self.node_of[s]: self._request(s, step, extra(s))
                    for s in site_ids if s in active}
        replies: dict[int, SecureReply] = fed.exchange(stage, requests, timeout, "secure")
        accepted: dict[str, SecureReply] = {}
        for node, reply in replies.items():
            site = fed.sites[node]
            if reply.ledger is not None:
                site.ledger = reply.ledger.model_dump()
            if reply.site_id != site.site_id:
                site.exclude(stage, "site_id_changed", f"replied as {reply.site_id!r}")
            elif not reply.ok:
                site.exclude(stage, str(reply.code), reply.reason)
            elif reply.secagg is None:
                site.exclude(stage, "malformed_reply", "no protocol message in the reply")
            else:
                site.stages[stage] = {"code": "ok", "reason": ""}
                accepted[site.site_id] = reply
        if step in ("masked_input", "share_keys"):  # the sites that charged their ledgers
            fed._issue_receipts(replies, stage)
        accepted = {s: reply for s, reply in accepted.items()
                    if fed.sites[self.node_of[s]].active}
        fed.secure_info["rounds"].append({"round": name, "survivors": sorted(accepted)})
        fed.write_view("running")
        fed.check_quorum(stage)
        self.require_threshold(len(accepted), stage)
        return accepted

    def require_threshold(self, n_sites: int, stage: str) -> None:
        """Raise :class:`QuorumNotMet` (after writing the view) below the threshold t."""
        if n_sites >= self.config.threshold:
            return
        message = (f"quorum not met after {stage}: {n_sites} site(s) remain, fewer than the "
                   f"secure-sum threshold t = {self.config.threshold}")
        self.fed.write_view("failed", message)
        raise QuorumNotMet(message)

    def decoded(self, payloads: dict[str, bytes], kind: type[M], sender: str,
                stage: str, check: Callable[[M], bool] = lambda message: True) -> dict[str, M]:
        """Each payload as a ``kind`` message sent by its site (field ``sender``) that
        passes ``check``; any other site is dropped as malformed."""
        messages: dict[str, M] = {}
        for site_id, data in payloads.items():
            try:
                message = kind.decode(data)
                if getattr(message, sender) != site_id or not check(message):
                    raise MessageError(f"not this site's {kind.kind} for this run and step")
            except MessageError as exc:
                self.fed.sites[self.node_of[site_id]].exclude(
                    f"secure:{stage}", "malformed_reply", str(exc))
                continue
            messages[site_id] = message
        self.require_threshold(len(messages), f"secure:{stage}")
        return messages

    # -- the run --------------------------------------------------------------------------
    def handshake_adverts(self) -> dict[str, bytes] | None:
        """Every admitted site's keys from its handshake reply, if they were asked for this
        run's threshold and every site sent them (else None: an advertise round)."""
        fed = self.fed
        adverts = {site.site_id: fed.handshake_adverts.get(site.node_id)
                   for site in fed.active()}
        if fed.handshake_threshold != self.config.threshold or None in adverts.values():
            return None
        fed.secure_info["rounds"].append({"round": "advertise", "in_handshake": True,
                                          "survivors": sorted(adverts)})
        return adverts  # type: ignore[return-value]

    def set_up(self) -> tuple[dict[str, ShareDelivery], dict[str, MaskedInput]]:
        """Advertise keys (unless the handshake did) and share keys, asking the first
        session's masked inputs with them; the shares to deliver, by recipient, and those
        inputs by site if they can be summed (else none: the session is asked again)."""
        timeout, no_extra = self.fed.cfg.key_timeout, (lambda site_id: {})
        payloads = self.handshake_adverts()
        if payloads is None:
            payloads = _messages(self.round("advertise", "advertise", self.config.sites,
                                            no_extra, timeout))
        adverts = self.decoded(payloads, KeyAdvertisement, "site_id", "advertise",
                               lambda m: (m.run_id, m.n_sessions, m.threshold) == (
                                   self.config.run_id, self.config.n_sessions,
                                   self.config.threshold))
        broadcast = self.protocol.broadcast_advertisements(adverts.values()).encode()
        first = self.first_input_request()
        extra = {"secagg": broadcast} if first is None else {
            "secagg": broadcast, "first_input": first.encode(),
            "public_state": PublicState().encode()}
        replies = self.round("share_keys", "share_keys", adverts, lambda site_id: extra,
                             timeout)
        bundles = self.decoded(_messages(replies), ShareBundle, "sender", "share_keys")
        deliveries = self.protocol.route_shares(bundles.values())
        return deliveries, self.early_inputs(first, replies)

    def first_input_request(self) -> MaskedInputRequest | None:
        """The first session's request to ride with key sharing, if its statistic needs no
        earlier sum (the histograms or the moments)."""
        if self.statistics[0] not in ("histograms", "moments"):
            return None
        length = PublicState().vector_length(self.statistics[0], self.clip, self.plan.n_trees)
        return self.protocol.first_input_request(length)

    def early_inputs(self, first: MaskedInputRequest | None,
                     replies: dict[str, SecureReply]) -> dict[str, MaskedInput]:
        """The first session's inputs from the key-sharing replies, when every site that
        advertised shared its keys and sent a well-formed input; else none."""
        if first is None or not self.protocol.first_inputs_usable():
            return {}
        inputs: dict[str, MaskedInput] = {}
        for site_id in first.participants:
            reply = replies.get(site_id)
            try:
                message = MaskedInput.decode(reply.first_input or b"") if reply else None
            except MessageError:
                return {}
            if message is None or (message.run_id, message.session, message.site_id,
                                   message.length) != (first.run_id, 0, site_id, first.length):
                return {}
            inputs[site_id] = message
        return inputs

    def secure_sum(self, statistic: str, state: PublicState,
                   deliveries: dict[str, ShareDelivery], early: dict[str, MaskedInput]
                   ) -> tuple[np.ndarray, tuple[str, ...]]:
        """One session: masked inputs over ``state`` (unless they came ``early``, with key
        sharing: then the shares ride with the unmasking), unmasking; (sum, survivors)."""
        masked = early or self.masked_inputs(statistic, state, deliveries)
        riding = deliveries if early else {}
        unmask = self.protocol.unmask_request(masked.values())
        answered = self.round(f"{statistic}:unmask", "unmask", unmask.survivors,
                              lambda site_id: {"secagg": unmask.encode(), **(
                                  {"delivery": riding[site_id].encode()} if site_id in riding
                                  else {})}, self.fed.cfg.release_timeout)
        replies = self.decoded(
            _messages(answered), UnmaskReply, "site_id", f"{statistic}:unmask",
            lambda m: (m.run_id, m.session) == (unmask.run_id, unmask.session))
        total = self.protocol.unmasked_sum(replies.values())
        self.fed.secure_info["sessions"].append(
            {"statistic": statistic, "survivors": list(unmask.survivors),
             "dropped": list(unmask.dropped),
             "inputs_round": "share_keys" if early else f"{statistic}:masked_input"})
        return total, unmask.survivors

    def masked_inputs(self, statistic: str, state: PublicState,
                      deliveries: dict[str, ShareDelivery]) -> dict[str, MaskedInput]:
        """One masked-input round over ``state`` (the shares ride with it if given)."""
        length = state.vector_length(statistic, self.clip, self.plan.n_trees)
        request = self.protocol.masked_input_request(length)
        shared = {"secagg": request.encode(), "public_state": state.encode()}
        timeout = self.fed.cfg.release_timeout
        answered = self.round(f"{statistic}:masked_input", "masked_input",
                              request.participants,
                              lambda site_id: {**shared, **(
                                  {"delivery": deliveries[site_id].encode()}
                                  if site_id in deliveries else {})}, timeout)
        return self.decoded(
            _messages(answered), MaskedInput, "site_id", f"{statistic}:masked_input",
            lambda m: (m.run_id, m.session, m.length) == (request.run_id, request.session,
                                                          length))

    def run(self) -> ModelBank:
        """Every round; the federation's bank, vetted against the plan's limits for a sum."""
        deliveries, early = self.set_up()

        def sum_of(statistic: str, box: tuple[np.ndarray, np.ndarray] | None,
                   depth: int | None, trees: Sequence[GlobalTree], frame: Frame | None
                   ) -> tuple[np.ndarray, tuple[str, ...]]:
            # the share deliveries ride with the first session's first round after keys
            first = statistic == self.statistics[0]
            return self.secure_sum(statistic, PublicState(box, depth, list(trees), frame),
                                   deliveries if first else {}, early if first else {})

        summed = summed_release(self.plan, self.settings, self.clip, sum_of, self.blocks)
        cfg = self.fed.cfg
        bank = summed.bank(self.plan, self.settings, {
            "session_survivors": [s["survivors"] for s in self.fed.secure_info["sessions"]],
            "epsilon": cfg.epsilon, "delta": cfg.delta})
        limits = secure_limits(self.plan, self.fed.width, summed.noise_sigma,
                               self.settings.n_sites)
        problems = release_problems(bank, limits)
        if problems:
            raise BankError("the summed bank does not fit the plan: " + "; ".join(problems))
        return bank


def _columns_view(fed: _Federation, plan: PrivacyPlan) -> dict[str, Any]:
    """What ``federation.json`` records of the summed columns: the encoded width, the
    columns with clipping histograms, the one-hot blocks kept in public coordinates, and
    the L2 sensitivity of the Gram sum they give (the one-hot blocks counted as one column
    each: :func:`~fediim.federated.release.coded_gram_sensitivity`)."""
    columns = fed.columns
    return {"encoded": columns.width,
            "clipped": np.flatnonzero(columns.clip_columns).tolist(),
            "onehot_blocks": columns.onehot_blocks,
            "gram_sensitivity": gram_share_sensitivity(columns.width, plan.n_trees,
                                                       columns.onehot_blocks)}


def _messages(replies: dict[str, SecureReply]) -> dict[str, bytes]:
    """Each accepted reply's protocol message (a round accepts only replies with one)."""
    return {site_id: reply.secagg or b"" for site_id, reply in replies.items()}


def secure_bank(fed: _Federation) -> ModelBank:
    """Run the secure rounds over ``fed``'s admitted sites; the bank (see module)."""
    try:
        return _SecureRounds(fed).run()
    except SecureAggregationError as exc:
        if "threshold" in str(exc):
            fed.write_view("failed", str(exc))
            raise QuorumNotMet(f"secure aggregation: {exc}") from exc
        raise
