"""The ServerApp's grid: Flower's HttpGrid, looking for replies often instead of every 3 s."""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace

import pytest
from flwr.superlink.grid import http_grid

from server import apprun


class ScriptedGrid(apprun.LoopbackGrid):
    """A LoopbackGrid whose SuperLink hands out one more reply per look."""

    def __init__(self, replies: int) -> None:
        super().__init__(runtime_api_address="127.0.0.1:1", insecure=True, token="t")
        self.ids = [f"m{i}" for i in range(replies)]
        self.looks: list[set[str]] = []

    def push_messages(self, messages: Iterable[object]) -> list[str]:
        return list(self.ids)

    def pull_messages(self, message_ids: Iterable[str]) -> list[SimpleNamespace]:
        wanted = sorted(message_ids)
        self.looks.append(set(wanted))
        meta = SimpleNamespace(reply_to_message_id=wanted[0])
        return [SimpleNamespace(metadata=meta)]


def test_replies_are_collected_with_short_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(apprun.time, "sleep", slept.append)
    grid = ScriptedGrid(replies=3)
    got = grid.send_and_receive([], timeout=None)
    assert sorted(m.metadata.reply_to_message_id for m in got) == ["m0", "m1", "m2"]
    assert grid.looks == [{"m0", "m1", "m2"}, {"m1", "m2"}, {"m2"}]  # only what is missing
    assert slept == [apprun.REPLY_POLL_S] * 2 and apprun.REPLY_POLL_S < 3


def test_a_timeout_still_ends_the_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(0, 1000, 10))  # each look of the clock: 10 s later
    monkeypatch.setattr(apprun.time, "time", lambda: float(next(clock)))
    monkeypatch.setattr(apprun.time, "sleep", lambda s: None)
    grid = ScriptedGrid(replies=50)
    got = grid.send_and_receive([], timeout=25)
    assert 0 < len(got) < 50


def test_reply_objects_are_pulled_with_a_short_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)  # restored after
    apprun.shorten_object_backoff()
    assert http_grid.pull_objects.keywords == {"initial_backoff": 0.05, "backoff_cap": 0.5}
