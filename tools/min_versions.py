"""Pin every dependency of the project to the floor it declares, for `make test-min`.

    python tools/min_versions.py > constraints-min.txt

Reads ``pyproject.toml``: each requirement of ``dependencies`` and of the optional extras (the
test tools of ``dev`` too) whose specifier has a lower bound ``>=X`` becomes ``name==X``. pip
installs the project under these constraints, so the tests run against the oldest versions the
project claims to support: a floor that is too low fails there, not on a user's machine.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_REQ = re.compile(r"^\s*([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*(.*)$")


def floors(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """Requirement name (normalised) -> its declared floor."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    requirements = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    out: dict[str, str] = {}
    for requirement in requirements:
        match = _REQ.match(requirement.split(";")[0])
        if match is None:
            continue
        name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
        if name == re.sub(r"[-_.]+", "-", project["name"]).lower():
            continue  # the project's own extras
        for spec in match.group(2).split(","):
            spec = spec.strip()
            if spec.startswith(">="):
                out[name] = spec.removeprefix(">=").strip()
    return out


def main() -> int:
    for name, version in sorted(floors().items()):
        print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
