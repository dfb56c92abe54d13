"""follow_run: a brief SuperLink outage is retried, a SuperLink that is gone ends the wait."""

from __future__ import annotations

import pytest

from flowerctl import control
from flowerctl.control import RunStatus, follow_run
from flowerctl.errors import SuperLinkUnreachable


def answers(*replies):
    """A stand-in for the Control API: each call gives the next reply (an exception raises)."""
    queue = list(replies)

    def run_status(conn, run_id):  # noqa: ANN001, ANN202
        reply = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(reply, Exception):
            raise reply
        return reply

    return run_status


def test_a_brief_outage_is_retried(monkeypatch):
    done = RunStatus("finished", "completed", "")
    down = SuperLinkUnreachable("connection refused")
    monkeypatch.setattr(control, "run_status", answers(down, down, done))
    assert follow_run(None, 1, timeout=60, poll=0.01, unreachable_for=30) == done


def test_a_superlink_that_stays_gone_ends_the_wait_long_before_the_deadline(monkeypatch):
    running = RunStatus("running", "", "")
    monkeypatch.setattr(
        control, "run_status", answers(running, SuperLinkUnreachable("connection refused"))
    )
    with pytest.raises(SuperLinkUnreachable, match="unreachable for"):
        follow_run(None, 1, timeout=3600, poll=0.01, unreachable_for=0.2)
