#!/usr/bin/env python3
"""Generate the Python code and typed stubs of the control API, or check them.

    python scripts/gen_protos.py          # regenerate in place
    python scripts/gen_protos.py --check  # exit 1 if the committed files are stale

One generator, pinned: grpcio-tools and mypy-protobuf at the versions in
pyproject.toml (the script refuses to run with others, so every machine writes
the same bytes). Output goes beside each ``.proto`` under ``proto/``, so
``proto/actorpool/control/v1/control.proto`` yields
``actorpool.control.v1.control_pb2`` (+ ``_grpc``, + ``.pyi`` stubs).
"""

from __future__ import annotations

import argparse
import difflib
import filecmp
import shutil
import sys
import tempfile
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
GENERATOR = ("grpcio-tools", "mypy-protobuf", "protobuf")
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def pinned(names: tuple[str, ...] = GENERATOR) -> dict[str, str]:
    """The exact versions ``pyproject.toml`` pins for ``names`` (runtime and dev)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [
        *project["dependencies"],
        *(r for extra in project["optional-dependencies"].values() for r in extra),
    ]
    pins: dict[str, str] = {}
    for requirement in requirements:
        name, sep, rest = requirement.partition("==")
        if sep and name.strip() in names:
            pins[name.strip()] = rest.split(";")[0].split("#")[0].strip()
    missing = [name for name in names if name not in pins]
    if missing:
        sys.exit(f"gen_protos: pyproject.toml pins no exact version of {', '.join(missing)}")
    return pins


def _check_versions() -> None:
    wrong = []
    for dist, want in pinned().items():
        try:
            have = metadata.version(dist)
        except metadata.PackageNotFoundError:
            have = "not installed"
        if have != want:
            wrong.append(f"{dist} {have} (need {want})")
    if wrong:
        sys.exit("gen_protos: pinned generator required: " + ", ".join(wrong) + " (make venv)")


def _plugin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        sys.exit(f"gen_protos: {name} not found (install the dev extra: make venv)")
    return found


def _protos() -> list[Path]:
    return sorted(p.relative_to(PROTO_ROOT) for p in PROTO_ROOT.rglob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Generate every proto under ``proto/`` into ``out``; return the files written."""
    import grpc_tools  # type: ignore[import-untyped]
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    protos = _protos()
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={well_known}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *(str(p) for p in protos),
    ]
    code = protoc.main(args)
    if code != 0:
        sys.exit(f"gen_protos: protoc failed with exit code {code}")
    return sorted(p.relative_to(out) for p in out.rglob("*") if p.name.endswith(GENERATED_SUFFIXES))


def _committed() -> list[Path]:
    return sorted(
        p.relative_to(PROTO_ROOT)
        for p in PROTO_ROOT.rglob("*")
        if p.name.endswith(GENERATED_SUFFIXES)
    )


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh_root = Path(tmp)
        fresh = generate(fresh_root)
        committed = _committed()
        problems: list[str] = []
        for rel in sorted(set(fresh) | set(committed)):
            new, old = fresh_root / rel, PROTO_ROOT / rel
            if rel not in committed:
                problems.append(f"missing: proto/{rel}")
            elif rel not in fresh:
                problems.append(f"stale (no longer generated): proto/{rel}")
            elif not filecmp.cmp(new, old, shallow=False):
                diff = list(
                    difflib.unified_diff(
                        old.read_text().splitlines(),
                        new.read_text().splitlines(),
                        f"proto/{rel} (committed)",
                        f"proto/{rel} (fresh)",
                        lineterm="",
                        n=1,
                    )
                )
                problems.append(f"differs: proto/{rel} ({len(diff)} diff lines)")
                problems.extend("    " + line for line in diff[:40])
    if problems:
        print("generated protobuf code is stale; run `make protos` and commit:")
        print("\n".join(problems))
        return 1
    print(f"generated protobuf code is fresh ({len(fresh)} files)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--check", action="store_true", help="fail if committed generated files are stale"
    )
    args = parser.parse_args()
    _check_versions()
    if args.check:
        return check()
    written = generate(PROTO_ROOT)
    for rel in written:
        print(f"wrote proto/{rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
