"""The site's Flower ClientApp: one ``@app.query()`` handler, dispatched on the ``stage`` field.

Start a SuperNode with ``--node-config 'site-config="/path/to/site.toml"'`` (see
:mod:`fediim.protocol.site_config`); the stages are implemented in :mod:`site_client.site`.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from site_client.site import handle

__all__ = ["app"]

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answer a fediim request (handshake, release or impute) with the site's reply."""
    content = handle(msg.content, node_config=dict(context.node_config), run_id=context.run_id,
                     node_id=context.node_id, state=context.state,
                     run_config=dict(context.run_config))
    return Message(content, reply_to=msg)
