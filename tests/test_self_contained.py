"""The repository is self-contained: no file refers to a path outside it (the
contract is docs/design.md, in the repository), and every relative Markdown
link points at a file that exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Spelt in pieces so that this file does not match itself.
OUTSIDE = re.compile("|".join([r"\.\./" + "shared", r"\b" + "DESIGN" + r"\.md", "/work" + "/"]))
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def repository_files() -> list[Path]:
    """The files git tracks; outside a git checkout, every file but the caches."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return [
            p
            for p in REPO.rglob("*")
            if not any(
                part.startswith(".") or part == "__pycache__" for part in p.parts[len(REPO.parts) :]
            )
        ]
    return [REPO / name.decode() for name in out.split(b"\0") if name]


def tracked_text_files() -> list[Path]:
    files = []
    for path in repository_files():
        if not path.is_file() or path.suffix in {".png", ".whl"}:
            continue
        data = path.read_bytes()
        if b"\0" not in data:
            files.append(path)
    return files


def test_the_checks_see_what_they_look_for() -> None:
    assert OUTSIDE.search("the contract is ../" + "shared/")
    assert OUTSIDE.search("see " + "DESIGN" + ".md")
    assert not OUTSIDE.search("see docs/design.md")
    assert LINK.findall("[a](docs/x.md#y) [b](https://e.org) [c](#here)") == [
        "docs/x.md",
        "https://e.org",
    ]


def test_nothing_refers_to_a_path_outside_the_repository() -> None:
    files = tracked_text_files()
    assert len(files) > 100  # the walk saw the repository
    found = [
        f"{path.relative_to(REPO)}:{n}: {line.strip()}"
        for path in files
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert found == []
    assert (REPO / "docs" / "design.md").is_file()


def test_every_relative_markdown_link_resolves() -> None:
    broken = [
        f"{doc.relative_to(REPO)}: {target}"
        for doc in tracked_text_files()
        if doc.suffix == ".md"
        for target in LINK.findall(doc.read_text())
        if not re.match(r"[a-z]+:", target) and not (doc.parent / target).exists()
    ]
    assert broken == []
