"""Build (once) and find an isolated virtual environment of the tests: ``<repo>/.venv-<name>``.

Some tests need packages that cannot go into ``.venv`` (their pins conflict with topx's), so each
gets its own environment. The helper for one (tests/checkov/checkov_env.py, tests/oracle/oracle_env.py)
says what it installs, where, and how a fresh build is checked; this module does the rest. Standard
library only, so it runs under any Python 3.11. tests/ is no package and the helpers also run as
scripts, so they load this file by its path.

A half-built environment is never used. It is built in ``<env_dir>-build/tmp-<pid>``, checked by the
helper, stamped, and only then renamed to ``<env_dir>``. The stamp records the hash of the helper's
requirements file and the Python version (plus what the helper adds); a mismatch rebuilds. An
exclusive lock on ``<env_dir>-build/lock`` serialises concurrent builders (two test runs, or
pytest-xdist workers), and a builder that waited re-checks before building.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

# Runs a command in the environment being built and returns its stdout; the string says what it does,
# for the log and for the error when it fails.
Runner = Callable[[list[str], str], str]


class IsolatedEnvError(RuntimeError):
    """An isolated environment could not be built."""


def python_of(env_dir: Path) -> Path:
    return env_dir / "bin" / "python"


def clean_env() -> dict[str, str]:
    """The caller's environment without what would point the isolated interpreter at another one."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


class IsolatedEnv:
    """One isolated environment: where it lives, what it installs, and how a fresh build is checked.

    ``check`` runs once the requirements are installed, with the new interpreter and a runner for
    commands, and raises ``error`` when the environment is not what it should be. ``stamp_extra``
    adds to the stamp (e.g. the pinned versions that matter). ``failure_hint`` turns the output of a
    failed command into a hint appended to the error, or "" for none.
    """

    def __init__(
        self,
        *,
        label: str,
        env_dir: Path,
        requirements: Path,
        stamp_name: str,
        stamp_extra: Callable[[], dict[str, object]],
        check: Callable[[Path, Runner], None],
        error: type[IsolatedEnvError],
        install_timeout_s: int,
        failure_hint: Callable[[str], str] = lambda output: "",
    ) -> None:
        self.label = label
        self.env_dir = env_dir
        # Both match the `.venv-*/` rule in .gitignore; the Makefile's clean target names each one.
        self.build_dir = env_dir.with_name(f"{env_dir.name}-build")
        self.requirements = requirements
        self.stamp_name = stamp_name
        self.stamp_extra = stamp_extra
        self.check = check
        self.error = error
        self.install_timeout_s = install_timeout_s
        self.failure_hint = failure_hint

    def expected_stamp(self) -> dict[str, object]:
        text = self.requirements.read_text()
        return {
            "requirements_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            **self.stamp_extra(),
        }

    def is_ready(self, env_dir: Path | None = None) -> bool:
        env_dir = self.env_dir if env_dir is None else env_dir
        stamp = env_dir / self.stamp_name
        if not stamp.is_file() or not python_of(env_dir).exists():
            return False
        try:
            return json.loads(stamp.read_text()) == self.expected_stamp()
        except (OSError, json.JSONDecodeError):
            return False

    def ensure_python(self, log: bool = True) -> Path:
        """The environment's interpreter, building the environment first when missing or stale."""
        if self.is_ready():
            return python_of(self.env_dir)
        self.build_dir.mkdir(exist_ok=True)
        with open(self.build_dir / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.is_ready():  # another process built it while we waited
                return python_of(self.env_dir)
            self._build(log)
        return python_of(self.env_dir)

    def _build(self, log: bool) -> None:
        staging = self.build_dir / f"tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)

        def run(command: list[str], what: str) -> str:
            return self._run(command, what, log)

        try:
            run([sys.executable, "-m", "venv", str(staging)], "create the virtual environment")
            python = python_of(staging)
            run(
                [str(python), "-m", "pip", "install", "--quiet", "--no-input", "--disable-pip-version-check",
                 "-r", str(self.requirements)],
                f"install {self.requirements.relative_to(self.env_dir.parent)}",
            )  # fmt: skip
            self.check(python, run)
            (staging / self.stamp_name).write_text(json.dumps(self.expected_stamp(), indent=2))
            if self.env_dir.exists():
                retired = self.build_dir / f"old-{os.getpid()}"
                os.rename(self.env_dir, retired)
                shutil.rmtree(retired, ignore_errors=True)
            os.rename(staging, self.env_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _run(self, command: list[str], what: str, log: bool) -> str:
        if log:
            print(f"{self.label}: {what}", file=sys.stderr, flush=True)
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=self.install_timeout_s, env=clean_env()
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise self.error(f"could not {what}: {exc}") from exc
        if done.returncode != 0:
            tail = (done.stdout + done.stderr)[-4000:]
            raise self.error(f"could not {what} (exit {done.returncode}):\n{tail}{self.failure_hint(tail)}")
        return done.stdout
