"""Build (once) and find the isolated oracle environment: ``<repo>/.venv-mxnet``.

Standard library only, so it runs under any Python 3.11: ``python tests/oracle/oracle_env.py``
builds the environment ahead of a test run and prints its interpreter.

A half-built environment is never used: it is built in ``.venv-mxnet-build/tmp-<pid>``, checked
(MXNet and SageMaker's writers import), stamped, and only then renamed to ``.venv-mxnet``. The
stamp records the hash of ``requirements.txt`` and the Python version; a mismatch rebuilds. A
lock file serialises concurrent builders (e.g. two test runs).
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
ENV_DIR = REPO_ROOT / ".venv-mxnet"
# Matches the `.venv-*/` rule in .gitignore, like ENV_DIR itself.
BUILD_DIR = REPO_ROOT / ".venv-mxnet-build"
STAMP_NAME = "topx-oracle-stamp.json"
SMOKE_TEST = (
    "import mxnet, numpy, scipy.sparse, sagemaker.amazon.common, sagemaker.amazon.record_pb2; "
    "assert mxnet.__version__ == '1.9.1', mxnet.__version__; print(mxnet.__version__, numpy.__version__)"
)
INSTALL_TIMEOUT_S = 900


class OracleEnvError(RuntimeError):
    """The oracle environment could not be built."""


DIRECT_REQUIREMENTS = ("mxnet", "numpy", "scipy", "sagemaker")
# libmxnet.so ships its own OpenBLAS and libgfortran but takes these from the system (Debian:
# libgomp1 and libquadmath0, both pulled in by gcc).
SYSTEM_LIBRARIES = ("libgomp", "libquadmath")


def expected_stamp() -> dict[str, object]:
    text = REQUIREMENTS.read_text()
    pins = dict(line.split("==", 1) for line in text.splitlines() if "==" in line and not line.startswith("#"))
    return {
        "requirements_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "versions": {name: pins.get(name) for name in DIRECT_REQUIREMENTS},
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


def ensure_oracle_python(log: bool = True) -> Path:
    """The oracle interpreter, building the environment first when it is missing or stale."""
    if is_ready():
        return python_of(ENV_DIR)
    BUILD_DIR.mkdir(exist_ok=True)
    with open(BUILD_DIR / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_ready():  # another process built it while we waited
            return python_of(ENV_DIR)
        _build(log)
    return python_of(ENV_DIR)


def _build(log: bool) -> None:
    staging = BUILD_DIR / f"tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _run([sys.executable, "-m", "venv", str(staging)], "create the virtual environment", log)
        python = str(python_of(staging))
        _run([python, "-m", "pip", "install", "--quiet", "--no-input", "--disable-pip-version-check",
              "-r", str(REQUIREMENTS)], "install tests/oracle/requirements.txt", log)
        _run([python, "-c", SMOKE_TEST], "import mxnet and sagemaker in the new environment", log)
        (staging / STAMP_NAME).write_text(json.dumps(expected_stamp(), indent=2))
        if ENV_DIR.exists():
            retired = BUILD_DIR / f"old-{os.getpid()}"
            os.rename(ENV_DIR, retired)
            shutil.rmtree(retired, ignore_errors=True)
        os.rename(staging, ENV_DIR)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _run(command: list[str], what: str, log: bool) -> None:
    if log:
        print(f"oracle env: {what}", file=sys.stderr, flush=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise OracleEnvError(f"could not {what}: {exc}") from exc
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-4000:]
        missing = [lib for lib in SYSTEM_LIBRARIES if f"{lib}.so" in tail]
        hint = f"\nmissing system libraries {missing}: apt-get install libgomp1 libquadmath0" if missing else ""
        raise OracleEnvError(f"could not {what} (exit {done.returncode}):\n{tail}{hint}")


if __name__ == "__main__":
    print(ensure_oracle_python())
