"""The SuperNode launcher: it fits Flower 1.42.0's loop exactly, shortens only its waits."""

from __future__ import annotations

import inspect
import time

import pytest
from flwr.supernode import start_client_internal as loop

from flowerctl import supernode


def test_flowers_loop_still_holds_the_waits_the_launcher_shortens() -> None:
    # Fails when a Flower update moved or changed the sleeps: the launcher must be revisited.
    supernode.check_source(inspect.getsource(loop))


@pytest.mark.parametrize(
    "edit",
    [("time.sleep(3)", "time.sleep(5)"), ("time.sleep(0.5)", "time.sleep(1)")],
)
def test_a_moved_wait_is_refused(edit: tuple[str, str]) -> None:
    source = inspect.getsource(loop).replace(*edit, 1)
    with pytest.raises(RuntimeError, match="fits Flower 1.42.0"):
        supernode.check_source(source)


def test_patch_shortens_the_idle_and_reply_waits_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop, "time", loop.time)  # restored after the test
    monkeypatch.setattr(loop, "pull_objects", loop.pull_objects)
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    supernode.patch()
    for seconds in (3, 0.5, 1.25):
        loop.time.sleep(seconds)
    assert slept == [supernode.IDLE_PULL_S, supernode.REPLY_POLL_S, 1.25]
    assert loop.time.monotonic is time.monotonic  # the rest of `time` is untouched
    assert loop.pull_objects.keywords == {"initial_backoff": 0.05, "backoff_cap": 0.5}


def test_another_flower_version_is_refused_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import flwr.supercore.version as version

    monkeypatch.setattr(version, "package_version", "1.43.0")
    monkeypatch.setattr(loop, "time", loop.time)
    assert supernode.main() == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "flower-supernode launcher: error: the SuperNode launcher fits Flower 1.42.0, but "
        "Flower 1.43.0 is installed: install flwr==1.42.0 (see pyproject.toml)"
    ]
    assert loop.time is time  # nothing was patched


def test_log_lines_carry_their_time_and_no_colour_in_a_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import io
    import logging

    from flwr.common.logger import console_handler

    monkeypatch.setattr(console_handler, "timestamps", console_handler.timestamps)  # restored
    monkeypatch.setattr(console_handler, "colored", console_handler.colored)
    monkeypatch.setattr("sys.stdout", io.StringIO())  # not a terminal, as under idc-client
    supernode.timed_logs()
    record = logging.LogRecord("flwr", logging.INFO, __file__, 1, "Received successfully", (), None)
    line = console_handler.format(record)
    assert "\x1b[" not in line and time.strftime("%Y-%m-%d") in line, line
