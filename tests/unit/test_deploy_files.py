"""The deployment kit, checked without a container engine: compose, Dockerfile, README commands.

Every command line is parsed by the real argument parser of the image's entrypoint, so a
renamed flag or subcommand breaks this test before it breaks a deployment.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest
import tomli
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
HOSPITALS = ("hosp1", "hosp2", "hosp3")
PORT = 8000


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return load("compose.yaml")


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions as (KEYWORD, rest), continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile").read_text())
    stages: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        keyword, _, rest = line.strip().partition(" ")
        if keyword.upper() == "FROM":
            current = rest.split()[-1] if " AS " in rest.upper() else rest
            stages[current] = []
        stages[current].append((keyword.upper(), rest.strip()))
    return stages


def entrypoint_of(target: str) -> str:
    """The program the target's image runs (inherited from the stage it is built FROM)."""
    stages = dockerfile_stages()
    for keyword, rest in reversed(stages[target]):
        if keyword == "ENTRYPOINT":
            program = yaml.safe_load(rest)  # exec form: a JSON array
            assert isinstance(program, list) and len(program) == 1, rest
            return program[0]
    base = stages[target][0][1].split()[0]
    assert base in stages, f"stage {target} has no ENTRYPOINT"
    return entrypoint_of(base)


def parser_for(program: str) -> argparse.ArgumentParser:
    """The real parser behind an installed command, found through [project.scripts]."""
    scripts = tomli.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert program in scripts, f"{program} is not one of the project's commands {scripts}"
    module = importlib.import_module(scripts[program].split(":")[0])
    return module.build_parser()


def parse(program: str, argv: list[str]) -> argparse.Namespace | None:
    """Parse like the command would; ``None`` for a bare ``--help`` (exit 0)."""
    try:
        return parser_for(program).parse_args(argv)
    except SystemExit as exc:
        if exc.code == 0 and argv == ["--help"]:
            return None
        pytest.fail(f"{program} {shlex.join(argv)}: rejected by its parser (exit {exc.code})")


def mounts(service: dict) -> list[tuple[str, str, str]]:
    """(source, target, mode) of each short-syntax volume; mode is "rw" or "ro"."""
    out = []
    for spec in service.get("volumes", []):
        assert isinstance(spec, str), f"use the short volume syntax: {spec}"
        src, dst, *mode = spec.split(":")
        out.append((src, dst, mode[0] if mode else "rw"))
    return out


def named(service: dict) -> set[str]:
    return {src for src, _, _ in mounts(service) if not src.startswith((".", "/"))}


def owner(service_name: str) -> str:
    """The party a service belongs to: ``coord`` or a hospital's name."""
    base = service_name.removesuffix("-admin")
    return "coord" if base == "coordinator" else base


def test_services_are_a_coordinator_and_three_hospitals_with_admin_tools(compose):
    parties = ["coordinator", *HOSPITALS]
    assert set(compose["services"]) == {*parties, *(f"{p}-admin" for p in parties)}
    for name, service in compose["services"].items():
        assert service["build"]["context"] == ".."
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        assert ("profiles" in service) == name.endswith("-admin"), name  # `up` skips admin


def test_every_volume_belongs_to_one_party_and_sites_mount_only_their_own(compose):
    services = compose["services"]
    used = set().union(*(named(s) for s in services.values()))
    assert used == set(compose["volumes"]), "declared volumes and mounted volumes differ"
    for name, service in services.items():
        for volume in named(service):
            assert volume.startswith(f"{owner(name)}-"), f"{name} mounts {volume}"
    for hosp in HOSPITALS:
        running = {dst: (src, mode) for src, dst, mode in mounts(services[hosp])}
        assert running["/site"] == (f"{hosp}-state", "rw")  # key, audit log, ledger, cache
        assert running["/data"] == (f"{hosp}-data", "ro")  # patients' patches: read only
        assert running["/pki"] == ("./pki/coordinator", "ro")  # the coordinator's CA only
        assert set(running) == {"/site", "/data", "/pki"}
        others = {f"{h}-{kind}" for h in HOSPITALS if h != hosp for kind in ("state", "data")}
        assert not named(services[hosp]) & others
        assert not named(services[f"{hosp}-admin"]) & others
    state_volumes = [f"{h}-state" for h in HOSPITALS]
    assert len(set(state_volumes)) == 3 and set(state_volumes) <= used


def test_only_the_coordinator_publishes_a_port_and_it_is_the_superlink_port(compose):
    services = compose["services"]
    published = {name: s["ports"] for name, s in services.items() if s.get("ports")}
    assert published == {"coordinator": [f"{PORT}:{PORT}"]}
    start = parse("idc-server", services["coordinator"]["command"])
    assert start.command == "start" and start.address == f"0.0.0.0:{PORT}"
    assert not start.insecure
    assert f"127.0.0.1:{PORT}/health" in " ".join(services["coordinator"]["healthcheck"]["test"])
    for hosp in HOSPITALS:
        assert "ports" not in services[hosp]  # SuperNodes dial out; nothing dials in
        assert services[f"{hosp}-admin"]["network_mode"] == "none"


def test_every_compose_command_parses_with_its_images_entrypoint(compose):
    checked = 0
    for name, service in compose["services"].items():
        program = entrypoint_of(service["build"]["target"])
        args = parse(program, service["command"])
        checked += 1
        if args is None:
            continue
        if owner(name) in HOSPITALS:
            assert program == "idc-client" and args.command == "start"
            assert args.server == f"{services_host(compose)}:{PORT}"
            assert str(args.dir) == "/site" and str(args.data) == "/data"
            assert str(args.ca).startswith("/pki/") and not args.insecure
    assert checked == len(compose["services"])


def services_host(compose: dict) -> str:
    return compose["services"]["coordinator"]["hostname"]


def test_images_for_coordinator_and_site_run_the_right_commands(compose):
    stages = dockerfile_stages()
    assert entrypoint_of("coordinator") == "idc-server"
    assert entrypoint_of("site") == "idc-client"
    targets = {s["build"]["target"] for s in compose["services"].values()}
    assert targets == {"coordinator", "site"} and targets <= set(stages)
    for name, service in compose["services"].items():
        want = "coordinator" if owner(name) == "coord" else "site"
        assert service["build"]["target"] == want, name


def test_dockerfile_copies_files_that_exist_and_the_ignore_file_keeps_them():
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    copied = []
    for stage in dockerfile_stages().values():
        for keyword, rest in stage:
            if keyword in ("COPY", "ADD"):
                assert "--from" not in rest, "no multi-stage copies expected"
                copied += rest.split()[:-1]
    assert "pyproject.toml" in copied
    for src in copied:
        assert (ROOT / src).exists(), f"COPY {src}: no such file in the repository"
        assert f"!{src}" in ignore, f"{src} is excluded from the build context"
    packages = tomli.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for pattern in packages["packages"]["find"]["include"]:
        assert pattern.rstrip("*") in copied, f"package {pattern} is not copied"


def test_torch_variant_selects_the_pytorch_index_with_cpu_by_default(compose):
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG TORCH_VARIANT=cpu$", text, re.M)
    assert "https://download.pytorch.org/whl/${TORCH_VARIANT}" in text
    for service in compose["services"].values():
        assert service["build"]["args"]["TORCH_VARIANT"] == "${TORCH_VARIANT:-cpu}"
    gpu = load("compose.gpu.yaml")["services"]
    assert set(gpu) == set(HOSPITALS)  # the coordinator never trains
    for service in gpu.values():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


def readme_commands() -> list[tuple[str, list[str]]]:
    """(program, argv) of each idc-* command line in deploy/README.md's code blocks."""
    text = (DEPLOY / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    compose = load("compose.yaml")["services"]
    out = []
    for line in re.sub(r"\\\n\s*", " ", "\n".join(blocks)).splitlines():
        line = line.split(" #")[0].split(" > ")[0].split(" < ")[0].strip()
        if not line.startswith("docker compose"):
            continue
        words = shlex.split(line)
        words = words[words.index("compose") + 1 :]
        while words and words[0] in ("-f",):
            words = words[2:]
        if words[0] == "exec" and "idc-server" in words:
            out.append(("idc-server", words[words.index("idc-server") + 1 :]))
        elif words[0] == "run":
            opts, rest = [], words[1:]
            while rest[0].startswith("-"):
                takes_value = rest[0] in ("--entrypoint", "-e")
                opts, rest = opts + rest[: 1 + takes_value], rest[1 + takes_value :]
            service, argv = rest[0], rest[1:]
            program = (
                opts[opts.index("--entrypoint") + 1]
                if "--entrypoint" in opts
                else entrypoint_of(compose[service]["build"]["target"])
            )
            if program.startswith("idc-"):
                out.append((program, argv))
    return out


def test_readme_command_lines_parse_with_the_real_parsers():
    commands = readme_commands()
    seen = {(program, argv[0]) for program, argv in commands}
    assert {
        ("idc-server", "init"),
        ("idc-server", "add-site"),
        ("idc-server", "remove-site"),
        ("idc-server", "run"),
        ("idc-client", "init"),
        ("idc-client", "check"),
        ("idc-sim", "synth"),
    } <= seen, seen
    for program, argv in commands:
        assert parse(program, argv) is not None


def test_readme_certificate_names_the_host_the_sites_dial(compose):
    inits = [
        argv
        for program, argv in readme_commands()
        if argv[:1] == ["init"] and program == "idc-server"
    ]
    assert inits and all(services_host(compose) in parse("idc-server", a).host for a in inits)
