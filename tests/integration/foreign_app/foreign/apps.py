"""The foreign app: a ClientApp that leaves a marker at the site, a ServerApp that leaves one at
the coordinator (``server-marker``: its working directory) and logs the sites' replies."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client = ClientApp()
server = ServerApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    """Run at the site: prove it by writing the site's node config to the marker file."""
    Path(str(context.run_config["marker"])).write_text(json.dumps(dict(context.node_config)))
    return Message(RecordDict({"metrics": MetricRecord({"ran": 1.0})}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    """Send one train message to every connected site; write what each answered."""
    if context.run_config["server-marker"]:  # proof that this code ran at the coordinator
        Path(str(context.run_config["server-marker"])).write_text(os.getcwd())
    deadline = time.monotonic() + 60
    nodes: list[int] = []
    while not nodes and time.monotonic() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    messages = [
        Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="train")
        for n in nodes
    ]
    replies = grid.send_and_receive(messages, timeout=240)
    rows = [
        {
            "node": r.metadata.src_node_id,
            "error_code": r.error.code if r.has_error() else None,
            "error": r.error.reason if r.has_error() else None,
        }
        for r in replies
    ]
    Path(str(context.run_config["out"])).write_text(json.dumps({"nodes": nodes, "replies": rows}))
