"""Build (once) and find the isolated oracle environment: ``<repo>/.venv-mxnet``.

Standard library only, so it runs under any Python 3.11: ``python tests/oracle/oracle_env.py``
builds the environment ahead of a test run and prints its interpreter.

The build, lock and stamp are tests/isolated_env.py's: a half-built environment is never used, and
a changed ``requirements.txt`` or Python version rebuilds. A fresh build counts only once MXNet and
SageMaker's writers import in it; the stamp also records the pins of the direct requirements.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
REQUIREMENTS = HERE / "requirements.txt"
ENV_DIR = REPO_ROOT / ".venv-mxnet"
SMOKE_TEST = (
    "import mxnet, numpy, scipy.sparse, sagemaker.amazon.common, sagemaker.amazon.record_pb2; "
    "assert mxnet.__version__ == '1.9.1', mxnet.__version__; print(mxnet.__version__, numpy.__version__)"
)
INSTALL_TIMEOUT_S = 900
DIRECT_REQUIREMENTS = ("mxnet", "numpy", "scipy", "sagemaker")
# libmxnet.so ships its own OpenBLAS and libgfortran but takes these from the system (Debian:
# libgomp1 and libquadmath0, both pulled in by gcc).
SYSTEM_LIBRARIES = ("libgomp", "libquadmath")

# Loaded by path: tests/ is no package, and this file runs as a script as well as from the tests.
_spec = importlib.util.spec_from_file_location("topx_isolated_env", HERE.parent / "isolated_env.py")
isolated_env = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(isolated_env)


class OracleEnvError(isolated_env.IsolatedEnvError):
    """The oracle environment could not be built."""


def _pinned_versions() -> dict[str, object]:
    lines = REQUIREMENTS.read_text().splitlines()
    pins = dict(line.split("==", 1) for line in lines if "==" in line and not line.startswith("#"))
    return {"versions": {name: pins.get(name) for name in DIRECT_REQUIREMENTS}}


def _check(python: Path, run: isolated_env.Runner) -> None:
    run([str(python), "-c", SMOKE_TEST], "import mxnet and sagemaker in the new environment")


def _missing_libraries_hint(output: str) -> str:
    missing = [lib for lib in SYSTEM_LIBRARIES if f"{lib}.so" in output]
    return f"\nmissing system libraries {missing}: apt-get install libgomp1 libquadmath0" if missing else ""


ENV = isolated_env.IsolatedEnv(
    label="oracle env",
    env_dir=ENV_DIR,
    requirements=REQUIREMENTS,
    stamp_name="topx-oracle-stamp.json",
    stamp_extra=_pinned_versions,
    check=_check,
    error=OracleEnvError,
    install_timeout_s=INSTALL_TIMEOUT_S,
    failure_hint=_missing_libraries_hint,
)


def ensure_oracle_python(log: bool = True) -> Path:
    """The oracle interpreter, building the environment first when it is missing or stale."""
    return ENV.ensure_python(log)


if __name__ == "__main__":
    print(ensure_oracle_python())
