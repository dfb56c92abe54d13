"""Where things live in a coordinator's folder and in a site's folder: every name spelled once.

``COORD_DIR`` (``idc-server init``) and ``SITE_DIR`` (``idc-client init``) are the two
parties' state folders. Both the parties and the simulation (which builds both kinds of
folder for its virtual sites) reach files only through these two classes, and site names
pass :func:`check_name` before they become file names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from common.fileio import private_dir

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MODEL_FILE = "model.idc"  # a model's weights with their provenance (common.provenance)


def check_name(name: str) -> str:
    """Site names go into logs and file names: keep them plain.

    A full match: ``re.match`` with ``$`` would accept a name ending in a newline.
    """
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError(f"site name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    return name


@dataclass(frozen=True)
class CoordPaths:
    """Where everything lives under COORD_DIR."""

    root: Path

    @property
    def tls(self) -> Path:  # noqa: D102
        return self.root / "tls"

    @property
    def sites(self) -> Path:  # noqa: D102
        return self.root / "sites.json"

    @property
    def site_keys(self) -> Path:  # noqa: D102
        return self.root / "site-keys"

    def site_key(self, name: str) -> Path:
        """The registered public key of site ``name``."""
        return self.site_keys / f"{check_name(name)}.pub"

    @property
    def key(self) -> Path:  # noqa: D102
        return self.root / "coordinator.key"

    @property
    def pub(self) -> Path:  # noqa: D102
        return self.root / "coordinator.pub"

    @property
    def audit(self) -> Path:  # noqa: D102
        return self.root / "audit" / "coordinator-audit.jsonl"

    @property
    def superlink(self) -> Path:  # noqa: D102
        return self.root / "superlink"

    @property
    def logs(self) -> Path:  # noqa: D102
        return self.root / "logs"

    def require(self) -> CoordPaths:
        """Fail with a clear message when COORD_DIR was never initialised."""
        if not self.sites.is_file() or not self.key.is_file():
            raise FileNotFoundError(
                f"{self.root} is not a coordinator folder (run `idc-server init --dir ...` first)"
            )
        private_dir(self.root)  # tightens a folder made by an older version (was 0755)
        return self

    @classmethod
    def of_log(cls, log: Path) -> CoordPaths:
        """The coordinator folder holding the audit log ``log`` (COORD_DIR/audit/...)."""
        return cls(_owner_of_log(log))


@dataclass(frozen=True)
class SitePaths:
    """Where everything lives under SITE_DIR (a site's state folder)."""

    root: Path

    @property
    def key(self) -> Path:  # noqa: D102
        return self.root / "site.key"

    @property
    def pub(self) -> Path:  # noqa: D102
        return self.root / "site.pub"

    @property
    def info(self) -> Path:
        """``{"site-name": ...}``, written by ``idc-client init``."""
        return self.root / "site.json"

    @property
    def audit(self) -> Path:  # noqa: D102
        return self.root / "audit" / "site-audit.jsonl"

    @property
    def ledger(self) -> Path:
        """The privacy ledger: every DP round of every run on this site's data sets."""
        return self.root / "privacy-ledger.json"

    @property
    def approvals(self) -> Path:
        """App (FAB) hashes approved by hand with ``idc-client approve``."""
        return self.root / "approved-apps.json"

    @property
    def refinements(self) -> Path:
        """Runs whose threshold refinement query this site answered (one a run)."""
        return self.root / "refinements.json"

    @property
    def evaluations(self) -> Path:
        """How many evaluations this site answered, per run (at most its cap a run)."""
        return self.root / "evaluations.json"

    @property
    def cache(self) -> Path:
        """Decoded-patch cache of a running site (never next to the data)."""
        return self.root / "cache"

    @property
    def flwr_home(self) -> Path:
        """The SuperNode's ``FLWR_HOME``."""
        return self.root / "flwr-home"

    @property
    def logs(self) -> Path:  # noqa: D102
        return self.root / "logs"

    def require(self) -> SitePaths:
        """Fail with a clear message when SITE_DIR was never initialised."""
        if not self.info.is_file():
            raise FileNotFoundError(
                f"{self.root} is not a site folder (run `idc-client init --dir ...` first)"
            )
        return self

    @classmethod
    def of_log(cls, log: Path) -> SitePaths:
        """The site folder holding the audit log ``log`` (SITE_DIR/audit/...)."""
        return cls(_owner_of_log(log))


def _owner_of_log(log: Path) -> Path:
    # An audit log lives in <owner>/audit/; the owner's public key sits beside that folder.
    log = Path(log).absolute()
    if log.parent.name != "audit":
        raise ValueError(
            f"{log} is not inside an audit/ folder, so its key cannot be found: give --key"
        )
    return log.parent.parent
