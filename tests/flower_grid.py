"""An in-process Flower ``Grid``: the real ServerApp and ClientApps in one process, no Ray.

This is the ONE place that touches Flower internals (kept here so a Flower upgrade breaks one
file):

- ``flwr.supercore.task_identity.TaskIdentity`` must hold a run/node/task id before the
  ServerApp can build a ``Message`` (:func:`run_server_app` sets and restores it);
- message ids are normally assigned by the SuperLink; here they are written through
  ``metadata.__dict__["_message_id"]`` as Flower's own ``InMemoryGrid`` does;
- ``flwr.supercore.run.Run`` is built with ``Run.create_empty``.

Each request is deep-copied before delivery (nothing is shared between "server" and
"client", as over the wire), each node keeps its own ``context.state`` across messages (as a
SuperNode does within a run), and a ClientApp exception becomes an error reply (as in a
deployment). Hooks for failure tests:

- ``drop(node_id, group_id) -> bool``: swallow that node's reply (a silent site);
- ``tamper(node_id, group_id, content) -> RecordDict``: rewrite a request before delivery
  (e.g. corrupt a signature in transit).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["InProcessGrid", "run_server_app"]

DropHook = Callable[[int, str], bool]
TamperHook = Callable[[int, str, RecordDict], RecordDict]


class InProcessGrid(Grid):
    """Deliver every message synchronously to ``client_app`` on behalf of one of ``nodes``.

    ``nodes`` maps node id -> node config (what ``flower-supernode --node-config`` gives).
    """

    def __init__(self, client_app: ClientApp, nodes: dict[int, dict[str, Any]], *,
                 run_id: int = 1, run_config: dict[str, Any] | None = None,
                 drop: DropHook | None = None, tamper: TamperHook | None = None) -> None:
        self._client_app = client_app
        self._nodes = {int(k): dict(v) for k, v in nodes.items()}
        self._states = {n: RecordDict() for n in self._nodes}
        self._run = Run.create_empty(run_id)
        self._run_config = dict(run_config or {})
        self._replies: dict[str, Message] = {}
        self.drop = drop
        self.tamper = tamper
        self.delivered: list[tuple[int, str]] = []  # (node, group id) of every delivery

    # -- Grid API -------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            ids.append(msg.metadata.message_id)
            reply = self._deliver(msg)
            if reply is not None:
                self._replies[msg.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    # -- delivery -------------------------------------------------------------------------
    def _deliver(self, msg: Message) -> Message | None:
        node = int(msg.metadata.dst_node_id)
        if node not in self._nodes:
            return None
        group = msg.metadata.group_id
        self.delivered.append((node, group))
        incoming = copy.deepcopy(msg)
        incoming.metadata.__dict__["_message_id"] = msg.metadata.message_id
        if self.tamper is not None:
            incoming.content = self.tamper(node, group, incoming.content)
        context = Context(run_id=self._run.run_id, node_id=node,
                          node_config=self._nodes[node], state=self._states[node],
                          run_config=self._run_config)
        try:
            reply = self._client_app(incoming, context)
        except Exception as exc:  # noqa: BLE001 - a deployed ClientApp failure is an error reply
            reply = Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"),
                            reply_to=incoming)
        self._states[node] = context.state
        if self.drop is not None and self.drop(node, group):
            return None
        reply = copy.deepcopy(reply)
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        return reply


def run_server_app(server_app: ServerApp, grid: InProcessGrid,
                   run_config: dict[str, Any] | None = None) -> None:
    """Run ``server_app`` against ``grid`` as the SuperLink would (same run id and config)."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    run_id = grid.run.run_id
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    context = Context(run_id=run_id, node_id=SUPERLINK_NODE_ID, node_config={},
                      state=RecordDict(), run_config=dict(run_config or grid._run_config))
    try:
        server_app(grid, context)
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
