"""scripts/ensure_system_deps.sh (run by ``make test``): installs Debian's
``prometheus`` only when nothing would prompt for a password, otherwise says why
in one line and lets the run go on (the Prometheus tests are then skipped).

The script runs for real under bash, with a ``PATH`` of stand-ins for the
system commands it may call (``id``, ``sudo``, ``apt-get``): each records its
arguments, so the test sees what would have been run, and nothing is installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ensure_system_deps.sh"
BASH = shutil.which("bash") or "/bin/bash"
#: Real commands the script (and the apt-get stand-in) use besides the stood-in ones.
TOOLS = ("chmod", "env", "mktemp", "rm", "tail", "true")

APT_GET = """#!/bin/sh
echo "apt-get DEBIAN_FRONTEND=$DEBIAN_FRONTEND $*" >> "$CALLS"
case " $* " in *" install "*)
    for bin in prometheus promtool; do
        printf '#!/bin/sh\\n' > "$BIN/$bin" && chmod +x "$BIN/$bin"
    done ;;
esac
"""
# sudo: -n succeeds only when passwordless; a sudo call without -n would prompt.
SUDO = """#!/bin/sh
echo "sudo $*" >> "$CALLS"
[ "$1" = "-n" ] || { echo "sudo would prompt here" >&2; exit 99; }
[ "$PASSWORDLESS" = 1 ] || { echo "sudo: a password is required" >&2; exit 1; }
shift
exec "$@"
"""


@dataclass
class Run:
    code: int
    stderr: str
    calls: list[str]


class Machine:
    """A ``PATH`` directory with the stand-ins a test asks for."""

    def __init__(self, root: Path) -> None:
        self.bin = root / "bin"
        self.bin.mkdir()
        self.calls = root / "calls"
        self.calls.touch()
        for tool in TOOLS:
            real = shutil.which(tool)
            assert real is not None, tool
            (self.bin / tool).symlink_to(real)
        self.uid(1000)

    def stub(self, name: str, body: str) -> None:
        path = self.bin / name
        path.write_text(body)
        path.chmod(0o755)

    def uid(self, uid: int) -> None:
        self.stub("id", f'#!/bin/sh\n[ "$1" = "-u" ] && echo {uid}\n')

    def run(self, *args: str, passwordless: bool = False) -> Run:
        env = {
            "PATH": str(self.bin),
            "CALLS": str(self.calls),
            "BIN": str(self.bin),
            "PASSWORDLESS": "1" if passwordless else "0",
        }
        proc = subprocess.run(
            [BASH, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60
        )
        return Run(proc.returncode, proc.stderr, self.calls.read_text().splitlines())


@pytest.fixture
def machine(tmp_path: Path) -> Machine:
    return Machine(tmp_path)


def test_nothing_is_done_when_both_binaries_are_there(machine: Machine) -> None:
    for bin in ("prometheus", "promtool"):
        machine.stub(bin, "#!/bin/sh\n")
    machine.stub("apt-get", APT_GET)
    machine.stub("sudo", SUDO)
    run = machine.run()
    assert (run.code, run.stderr, run.calls) == (0, "", [])


def test_sudo_with_a_password_is_never_asked_one_line_and_the_run_goes_on(
    machine: Machine,
) -> None:
    machine.stub("apt-get", APT_GET)
    machine.stub("sudo", SUDO)
    run = machine.run()
    assert run.code == 0
    assert run.calls == ["sudo -n true"]  # asked without prompting, nothing else
    why = "not root, and sudo would ask for a password"
    hint = "apt-get install prometheus (Prometheus >= 2.37), or run as root"
    assert run.stderr.splitlines() == [
        f"ensure_system_deps: prometheus promtool not installed ({why}): {hint}"
    ]


@pytest.mark.parametrize(
    ("stubs", "why"),
    [({"apt-get"}, "not root, and no sudo"), ({"sudo"}, "no apt-get on this machine")],
)
def test_without_sudo_or_apt_get_one_line_and_the_run_goes_on(
    machine: Machine, stubs: set[str], why: str
) -> None:
    if "apt-get" in stubs:
        machine.stub("apt-get", APT_GET)
    if "sudo" in stubs:
        machine.stub("sudo", SUDO)
    run = machine.run()
    assert run.code == 0
    assert run.calls == []
    (line,) = run.stderr.splitlines()
    assert line.startswith(f"ensure_system_deps: prometheus promtool not installed ({why}): ")


def test_require_makes_a_missing_binary_an_error(machine: Machine) -> None:
    machine.stub("sudo", SUDO)
    run = machine.run("--require")
    assert run.code == 1
    assert "no apt-get on this machine" in run.stderr


@pytest.mark.parametrize(("uid", "prefix"), [(0, ""), (1000, "sudo -n ")])
def test_installs_without_a_prompt_as_root_or_through_passwordless_sudo(
    machine: Machine, uid: int, prefix: str
) -> None:
    machine.uid(uid)
    machine.stub("apt-get", APT_GET)
    machine.stub("sudo", SUDO)
    run = machine.run(passwordless=True)
    assert run.code == 0, run.stderr
    apt = "apt-get DEBIAN_FRONTEND=noninteractive -o DPkg::Lock::Timeout=300"
    assert [c for c in run.calls if c.startswith("apt-get")] == [
        f"{apt} update -qq",
        f"{apt} install -y -qq --no-install-recommends prometheus",
    ]
    sudo = [c for c in run.calls if c.startswith("sudo")]
    assert len(sudo) == (3 if prefix else 0)  # sudo -n true, then the two apt-get calls
    assert all(c.startswith("sudo -n ") for c in sudo)
    assert os.access(machine.bin / "promtool", os.X_OK)
    assert run.stderr.splitlines() == [
        "ensure_system_deps: installing Debian package prometheus (for prometheus promtool)"
    ]
