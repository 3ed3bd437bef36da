"""Build (once) and find the isolated checkov environment: ``<repo>/.venv-checkov``.

Standard library only, so it runs under any Python 3.11:

    python tests/checkov/checkov_env.py                 # build if needed, print the interpreter
    python tests/checkov/checkov_env.py TEMPLATE [ARGS]  # build if needed, run checkov on TEMPLATE

Why a separate environment: checkov pins boto3 and botocore below the versions topx runs on, so
installing it into ``.venv`` would downgrade them.

A half-built environment is never used. It is built in ``.venv-checkov-build/tmp-<pid>``, checked
(``checkov --version`` must print the pinned version), stamped, and only then renamed to
``.venv-checkov``. The stamp records the hash of ``requirements.txt`` and the Python version; a
mismatch rebuilds. An exclusive lock on ``.venv-checkov-build/lock`` serialises concurrent builders
(two test runs, or pytest-xdist workers), and a builder that waited re-checks before building.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
REQUIREMENTS = HERE / "requirements.txt"
# Both match the `.venv-*/` rule in .gitignore.
ENV_DIR = REPO_ROOT / ".venv-checkov"
BUILD_DIR = REPO_ROOT / ".venv-checkov-build"
STAMP_NAME = "topx-checkov-stamp.json"
INSTALL_TIMEOUT_S = 600
# Run as a module, not through bin/checkov: console scripts carry the absolute path of the staging
# directory in their shebang, which the rename into place breaks. bin/python is a symlink and moves.
CHECKOV_MODULE = "checkov.main"
# Offline and deterministic: use the checks that ship with the pinned version, fetch nothing.
OFFLINE_FLAGS = ("--skip-download",)


class CheckovEnvError(RuntimeError):
    """The checkov environment could not be built."""


def pinned_version() -> str:
    for line in REQUIREMENTS.read_text().splitlines():
        if line.startswith("checkov=="):
            return line.split("==", 1)[1].strip()
    raise CheckovEnvError(f"{REQUIREMENTS} does not pin checkov")


def expected_stamp() -> dict[str, object]:
    text = REQUIREMENTS.read_text()
    return {
        "requirements_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "checkov": pinned_version(),
    }


def python_of(env_dir: Path) -> Path:
    return env_dir / "bin" / "python"


def is_ready(env_dir: Path = ENV_DIR) -> bool:
    stamp = env_dir / STAMP_NAME
    if not stamp.is_file() or not python_of(env_dir).exists():
        return False
    try:
        return json.loads(stamp.read_text()) == expected_stamp()
    except (OSError, json.JSONDecodeError):
        return False


def ensure_checkov_python(log: bool = True) -> Path:
    """The interpreter of the checkov environment, building the environment first when missing or stale."""
    if is_ready():
        return python_of(ENV_DIR)
    BUILD_DIR.mkdir(exist_ok=True)
    with open(BUILD_DIR / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_ready():  # another process built it while we waited
            return python_of(ENV_DIR)
        _build(log)
    return python_of(ENV_DIR)


def checkov_command(python: Path, template: Path, *extra: str, output: str = "json") -> list[str]:
    """The command that scans one CloudFormation template and prints checkov's report (JSON by default)."""
    return [
        str(python), "-m", CHECKOV_MODULE,
        "--file", str(template), "--framework", "cloudformation", "--output", output,
        *OFFLINE_FLAGS, *extra,
    ]  # fmt: skip


def clean_env() -> dict[str, str]:
    """The caller's environment without what would point the isolated interpreter at another one."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _build(log: bool) -> None:
    staging = BUILD_DIR / f"tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _run([sys.executable, "-m", "venv", str(staging)], "create the virtual environment", log)
        python = str(python_of(staging))
        _run(
            [python, "-m", "pip", "install", "--quiet", "--no-input", "--disable-pip-version-check",
             "-r", str(REQUIREMENTS)],
            "install tests/checkov/requirements.txt", log,
        )  # fmt: skip
        version = _run([python, "-m", CHECKOV_MODULE, "--version"], "run checkov --version", log).strip()
        if version != pinned_version():
            raise CheckovEnvError(f"checkov --version printed {version!r}, expected {pinned_version()!r}")
        (staging / STAMP_NAME).write_text(json.dumps(expected_stamp(), indent=2))
        if ENV_DIR.exists():
            retired = BUILD_DIR / f"old-{os.getpid()}"
            os.rename(ENV_DIR, retired)
            shutil.rmtree(retired, ignore_errors=True)
        os.rename(staging, ENV_DIR)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _run(command: list[str], what: str, log: bool) -> str:
    if log:
        print(f"checkov env: {what}", file=sys.stderr, flush=True)
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, env=clean_env()
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CheckovEnvError(f"could not {what}: {exc}") from exc
    if done.returncode != 0:
        raise CheckovEnvError(
            f"could not {what} (exit {done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}"
        )
    return done.stdout


def main(argv: list[str]) -> int:
    python = ensure_checkov_python()
    if not argv:
        print(python)
        return 0
    template, *extra = argv
    command = checkov_command(python, Path(template), "--compact", "--quiet", *extra, output="cli")
    return subprocess.run(command, env=clean_env()).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
