"""Reading the Dockerfiles and the images' requirement files, for the tests that check them
(tests/infra/test_infra.py, tests/infra/test_images.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
_PIN_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)==([^\s;#]+)$")


def dockerfile_instructions(path: str) -> list[tuple[str, str]]:
    """(instruction, arguments) pairs of the Dockerfile at ``path`` (from the repository root), continuation
    lines joined, comments dropped."""
    lines, current = [], ""
    for raw in (REPO_ROOT / path).read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        current += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            instruction, _, rest = current.strip().partition(" ")
            lines.append((instruction.upper(), rest.strip()))
            current = ""
    return lines


def exec_form(path: str, instruction: str) -> list[str]:
    (args,) = [rest for name, rest in dockerfile_instructions(path) if name == instruction]
    return json.loads(args)


def arg_default(path: str, name: str) -> str:
    """The default value of ``ARG name=...`` ("" for ``ARG name=``)."""
    (value,) = [rest.split("=", 1)[1] for inst, rest in dockerfile_instructions(path)
                if inst == "ARG" and rest.startswith(f"{name}=")]
    return value.strip('"')


def pins(path: str) -> list[tuple[str, str, str]]:
    """(line, name, version) of each requirement of a requirements file; a line that is not a plain
    ``name==version`` pin raises ValueError naming the file and the line."""
    found = []
    for number, raw in enumerate((REPO_ROOT / path).read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _PIN_RE.match(line)
        if match is None:
            raise ValueError(f"{path} line {number}: {line!r} is not a name==version pin")
        found.append((line, match.group(1), match.group(2)))
    return found
