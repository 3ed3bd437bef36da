"""Build (once) and find the isolated checkov environment: ``<repo>/.venv-checkov``.

Standard library only, so it runs under any Python 3.11:

    python tests/checkov/checkov_env.py                 # build if needed, print the interpreter
    python tests/checkov/checkov_env.py TEMPLATE [ARGS]  # build if needed, run checkov on TEMPLATE

Why a separate environment: checkov pins boto3 and botocore below the versions topx runs on, so
installing it into ``.venv`` would downgrade them.

The build, lock and stamp are tests/isolated_env.py's: a half-built environment is never used, and
a changed ``requirements.txt`` or Python version rebuilds. A fresh build counts only once
``checkov --version`` prints the pinned version; the stamp also records that version.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
REQUIREMENTS = HERE / "requirements.txt"
ENV_DIR = REPO_ROOT / ".venv-checkov"
INSTALL_TIMEOUT_S = 600
# Run as a module, not through bin/checkov: console scripts carry the absolute path of the staging
# directory in their shebang, which the rename into place breaks. bin/python is a symlink and moves.
CHECKOV_MODULE = "checkov.main"
# Offline and deterministic: use the checks that ship with the pinned version, fetch nothing.
OFFLINE_FLAGS = ("--skip-download",)

# Loaded by path: tests/ is no package, and this file runs as a script as well as from the tests.
_spec = importlib.util.spec_from_file_location("topx_isolated_env", HERE.parent / "isolated_env.py")
isolated_env = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(isolated_env)
clean_env = isolated_env.clean_env


class CheckovEnvError(isolated_env.IsolatedEnvError):
    """The checkov environment could not be built."""


def pinned_version() -> str:
    for line in REQUIREMENTS.read_text().splitlines():
        if line.startswith("checkov=="):
            return line.split("==", 1)[1].strip()
    raise CheckovEnvError(f"{REQUIREMENTS} does not pin checkov")


def _check(python: Path, run: isolated_env.Runner) -> None:
    version = run([str(python), "-m", CHECKOV_MODULE, "--version"], "run checkov --version").strip()
    if version != pinned_version():
        raise CheckovEnvError(f"checkov --version printed {version!r}, expected {pinned_version()!r}")


ENV = isolated_env.IsolatedEnv(
    label="checkov env",
    env_dir=ENV_DIR,
    requirements=REQUIREMENTS,
    stamp_name="topx-checkov-stamp.json",
    stamp_extra=lambda: {"checkov": pinned_version()},
    check=_check,
    error=CheckovEnvError,
    install_timeout_s=INSTALL_TIMEOUT_S,
)


def ensure_checkov_python(log: bool = True) -> Path:
    """The interpreter of the checkov environment, building the environment first when missing or stale."""
    return ENV.ensure_python(log)


def checkov_command(python: Path, template: Path, *extra: str, output: str = "json") -> list[str]:
    """The command that scans one CloudFormation template and prints checkov's report (JSON by default)."""
    return [
        str(python), "-m", CHECKOV_MODULE,
        "--file", str(template), "--framework", "cloudformation", "--output", output,
        *OFFLINE_FLAGS, *extra,
    ]  # fmt: skip


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
