"""The coordinator's executor without a SuperLink: a foreign app refused and recorded, ours run.

The SuperLink's Runtime API is the boundary: a stand-in answers the two calls the executor
makes for a task; everything else is real (the coordinator folder, its audit log, the FABs
Flower builds, the installed idc-fl).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk, build_fab_from_files
from flwr.common.constant import SubStatus
from flwr.proto.fab_pb2 import Fab
from flwr.proto.message_pb2 import Context
from flwr.proto.run_pb2 import Run
from flwr.proto.runtime_pb2 import PullTaskInputResponse, PushTaskOutputResponse

from common.audit_verify import verify_log
from common.keys import load_public_key
from common.paths import CoordPaths
from flowerctl.fab import InstalledApp, fab_hash
from server.apprun import read_task
from server.cli import main
from server.executor import PROJECT_ROOT, ServerExecutor, task_bytes, write_secret

FOREIGN = Path(__file__).parents[1] / "integration" / "foreign_app"


class RuntimeStandIn:
    """The SuperLink's side of one claimed task: its input, and the output pushed back."""

    def __init__(self, given: PullTaskInputResponse) -> None:
        self.given, self.pushed, self.closed = given, [], False

    def PullTaskInput(self, _request):  # noqa: N802, D102 - Flower's method name
        return self.given

    def PushTaskOutput(self, request):  # noqa: N802, D102
        self.pushed.append(request)
        return PushTaskOutputResponse()

    def close(self) -> None:  # noqa: D102
        self.closed = True


@pytest.fixture
def coord(tmp_path):
    root = tmp_path / "coord"
    assert main(["init", "--dir", str(root)]) == 0
    paths = CoordPaths(root)
    write_secret(paths)
    return paths


@pytest.fixture(scope="module")
def installed():
    return InstalledApp.snapshot(PROJECT_ROOT)


def task(content: bytes, fab_id: str, run_id: int = 42) -> PullTaskInputResponse:
    return PullTaskInputResponse(
        run=Run(run_id=run_id, fab_id=fab_id, fab_version="1.0.0", fab_hash=fab_hash(content)),
        context=Context(run_id=run_id, node_id=0),
        fab=Fab(hash_str=fab_hash(content), content=content),
        task_id=7,
    )


class Recorder(ServerExecutor):
    """The real executor, talking to the stand-in and noting what it would start."""

    def __init__(self, coord, installed, runtime: RuntimeStandIn) -> None:
        super().__init__("127.0.0.1:1", None, coord, installed)
        self.runtime, self.spawned = runtime, []

    def client(self, token=None):  # noqa: D102
        return self.runtime

    def spawn(self, token, res):  # noqa: D102
        self.spawned.append((token, res))
        return None


def executor(coord, installed, given):
    runtime = RuntimeStandIn(given)
    return Recorder(coord, installed, runtime), runtime


def audit_entries(coord: CoordPaths) -> list[dict]:
    return [json.loads(x) for x in coord.audit.read_text().splitlines() if x]


def test_a_foreign_app_is_refused_unopened_recorded_and_its_task_failed(coord, installed, tmp_path):
    app = tmp_path / "foreignapp"
    shutil.copytree(FOREIGN, app, ignore=shutil.ignore_patterns("__pycache__"))
    content = build_fab_from_disk(app)
    ex, runtime = executor(coord, installed, task(content, "mallory/foreignapp"))
    ex.handle("token")
    assert ex.spawned == [] and ex.running == {}
    [out] = runtime.pushed
    assert out.sub_status == SubStatus.FAILED
    assert f"the coordinator refused app {fab_hash(content)} (mallory/foreignapp" in out.details
    assert runtime.closed
    [entry] = [e for e in audit_entries(coord) if e["action"] == "app.refused"]
    assert entry["object"] == "42" and entry["outcome"] == "refused"
    assert entry["details"]["app_hash"] == fab_hash(content)
    assert entry["details"]["publisher"] == "mallory"
    assert "pyproject.toml differs" in entry["details"]["reason"]
    assert verify_log(coord.audit, load_public_key(coord.pub)).ok


def test_the_installed_app_is_handed_on_without_its_fab(coord, installed):
    files: dict[str, bytes | Path] = {rel: PROJECT_ROOT / rel for rel in installed.files}
    # As `flwr run` builds it: .gitignore keeps a checkout's runs/ (make demo's output) out.
    files[".gitignore"] = PROJECT_ROOT / ".gitignore"
    content, _ = build_fab_from_files(files)
    before = coord.audit.read_text()
    ex, runtime = executor(coord, installed, task(content, "idc/idc-fl"))
    ex.handle("token")
    assert runtime.pushed == [] and coord.audit.read_text() == before
    [(token, given)] = ex.spawned
    assert token == "token" and 42 in ex.running
    token, handed = read_task(task_bytes(token, given))
    assert token == "token" and handed.run.run_id == 42 and handed.task_id == 7
    assert not handed.HasField("fab")  # the ServerApp never sees the bundle's bytes


def test_a_serverapp_process_without_a_token_is_refused():
    with pytest.raises(ValueError, match="no task token"):
        read_task(b"")
