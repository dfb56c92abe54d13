"""Sites are their keys: a view of Flower's Grid that shows only nodes holding a registered key.

The SuperLink authenticates every SuperNode by its public key (``--enable-supernode-auth``)
and reports that key with each node (``Grid.get_nodes()``). Names are not identities: Flower
accepts two nodes under one name, and a node's name is whatever was registered with it. So a
node is a site exactly when the fingerprint of its key is in the coordinator's registry, and
its site name is the registry's name for that key. The strategy hands this view, not the
real grid, to FedAvg, so training *and* evaluation sample registered nodes only; two nodes
can never merge into one site, because a key is registered under one name only.

Simulation (``keyless``): Flower's simulation engine gives its virtual nodes random bytes as
keys and has no node authentication; every node there is created by the coordinator's own
process. The view then shows every node, and the strategy binds a node to the registered name
its first signed reply proves (one node per name).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # the type Grid.get_nodes() yields
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from common import keys


def node_fingerprint(public_key: bytes) -> str | None:
    """Fingerprint of a node's key as the SuperLink reports it (PEM), or None if it is none."""
    try:
        key = serialization.load_pem_public_key(bytes(public_key))
    except (ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return None
    return keys.public_key_fingerprint(key)


class SiteGrid(Grid):
    """The real grid, showing only the nodes whose key is registered (see module docstring).

    Parameters
    ----------
    grid : Grid
        The run's grid; messages still travel through it.
    sites_by_fingerprint : Mapping[str, str]
        Registered key fingerprint -> site name.
    keyless : bool
        Simulation: show every node (nodes there carry no real key).
    """

    def __init__(
        self, grid: Grid, sites_by_fingerprint: Mapping[str, str], keyless: bool = False
    ) -> None:
        self.grid = grid
        self.sites_by_fingerprint = dict(sites_by_fingerprint)
        self.keyless = keyless
        self.strangers: dict[int, str] = {}  # connected nodes without a registered key

    def sites(self) -> dict[int, str]:
        """Connected registered nodes: node id -> site name (empty names in simulation)."""
        return self._classify(list(self.grid.get_nodes()))

    def _classify(self, nodes: list[NodeInfo]) -> dict[int, str]:
        found: dict[int, str] = {}
        self.strangers = {}
        for node in nodes:
            name = self.sites_by_fingerprint.get(node_fingerprint(node.public_key) or "")
            if self.keyless:
                found[node.node_id] = ""
            elif name is None:
                self.strangers[node.node_id] = node.name
            else:
                found[node.node_id] = name
        return found

    # -- the Grid interface: what FedAvg samples from, and what it sends through ---------
    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return list(self.sites())

    def get_nodes(self) -> Iterable[NodeInfo]:  # noqa: D102
        nodes = list(self.grid.get_nodes())
        ids = self._classify(nodes)
        return [node for node in nodes if node.node_id in ids]

    def set_run(self, run: Run) -> None:  # noqa: D102
        self.grid.set_run(run)

    @property
    def run(self) -> Run:  # noqa: D102
        return self.grid.run

    def create_message(  # noqa: D102
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return self.grid.pull_messages(message_ids)

    def send_and_receive(  # noqa: D102
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)
