"""What crosses the SuperLink for one round: a Flower `Grid` that counts bytes and can keep what came back.

The ServerApp talks to the sites only through its `Grid`; wrapping it is the one place that sees every message
the server-side process sends and receives. `MeteredGrid` counts the serialised size of each message's content
(the protobuf Flower puts on the wire, `recorddict_to_proto`) per direction, for the round record and for
bench/learning; with `keep=True` it also keeps the received messages, so a test can inspect exactly what the
server held (with SecAgg+: masked integer vectors, never a site's update).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Message, RecordDict
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run


def content_bytes(content: RecordDict) -> int:
    return int(recorddict_to_proto(content).ByteSize())


@dataclass
class Traffic:
    sent_bytes: int = 0
    received_bytes: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    seconds: float = 0.0  # wall time spent waiting in send_and_receive
    received: list[tuple[str, dict[str, np.ndarray]]] = field(default_factory=list)  # with keep=True
    by_node: dict[int, int] = field(default_factory=dict)  # bytes received from each node

    def as_dict(self) -> dict[str, float | int]:
        return {
            "sentBytes": self.sent_bytes,
            "receivedBytes": self.received_bytes,
            "messagesSent": self.messages_sent,
            "messagesReceived": self.messages_received,
            "seconds": round(self.seconds, 4),
        }


def message_arrays(m: Message) -> dict[str, np.ndarray]:
    """Every array in a received message: ArrayRecords as they came, and every bytes value of a ConfigRecord that
    decodes as a NumPy array (how SecAgg+ carries its masked vectors). Copied at once: Flower's workflows take
    the arrays out of a message when they convert it (`keep_input=False`)."""
    from flwr.common import bytes_to_ndarray

    arrays: dict[str, np.ndarray] = {}
    if not m.has_content():
        return arrays
    for rname, record in m.content.array_records.items():
        for aname, array in record.items():
            arrays[f"array/{rname}/{aname}"] = np.array(array.numpy(), copy=True)
    for rname, config in m.content.config_records.items():
        for key, value in config.items():
            values = value if isinstance(value, list) else [value]
            for j, v in enumerate(values):
                if isinstance(v, bytes):
                    try:
                        arrays[f"config/{rname}/{key}/{j}"] = bytes_to_ndarray(v)
                    except Exception:  # not an ndarray: keys, ciphertexts, shares
                        continue
    return arrays


def write_transcript(received: list[tuple[str, dict[str, np.ndarray]]], directory: Path) -> int:
    """What the server received, one .npz per message (`message_arrays`). Returns the count."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, (name, arrays) in enumerate(received):
        np.savez(directory / f"{i:04d}-{name}.npz", **arrays)  # type: ignore[arg-type]
    return len(received)


class MeteredGrid(Grid):
    """A `Grid` that delegates everything to `inner` and meters the messages that pass."""

    def __init__(self, inner: Grid, keep: bool = False) -> None:
        self.inner = inner
        self.keep = keep
        self.traffic = Traffic()

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def _sent(self, messages: list[Message]) -> None:
        for m in messages:
            self.traffic.sent_bytes += content_bytes(m.content)
            self.traffic.messages_sent += 1

    def _received(self, messages: list[Message]) -> None:
        for m in messages:
            if m.has_content():
                size = content_bytes(m.content)
                self.traffic.received_bytes += size
                node = int(m.metadata.src_node_id)
                self.traffic.by_node[node] = self.traffic.by_node.get(node, 0) + size
            self.traffic.messages_received += 1
            if self.keep:
                kind = m.metadata.message_type.replace("/", "-").replace(".", "-")
                self.traffic.received.append((f"node{m.metadata.src_node_id}-{kind}", message_arrays(m)))

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        out = list(messages)
        self._sent(out)
        return self.inner.push_messages(out)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        got = list(self.inner.pull_messages(message_ids))
        self._received(got)
        return got

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        out = list(messages)
        self._sent(out)
        start = time.monotonic()
        got = list(self.inner.send_and_receive(out, timeout=timeout))
        self.traffic.seconds += time.monotonic() - start
        self._received(got)
        return got
