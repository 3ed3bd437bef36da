"""Light commands stay light: the CLI's parser (every --help), reading recommendations, the deployed
stack's client, the Lambda handlers' module and the data preparation import neither torch nor faiss; the
deploy contract, which `cdk synth` imports, not even numpy; the CLI and the offline package import no moto,
which is an optional extra. Each check runs in a fresh interpreter, where sys.modules shows exactly what the
import pulled in."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "faiss")
# What the CDK app must not load through topx: the array and AWS libraries too.
NOT_IN_SYNTH = ("numpy", "torch", "faiss", "pandas", "boto3")


def heavy_modules_after(code: str, heavy: tuple[str, ...] = HEAVY) -> list[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("code", [
    "from topx.cli import build_parser; build_parser()",
    "from topx.cli import main\ntry:\n    main(['recs', '--help'])\nexcept SystemExit:\n    pass",
    "import topx.aws.client, topx.aws.store",
    "import functions.handlers",
    # What the Prepare function runs: reading, validating and indexing the upload.
    "from topx.dataset import DataOptions, load_dataset\nfrom topx.rundir import save_interactions\nimport topx.aws.stages",
])
def test_light_entry_points_import_neither_torch_nor_faiss(code: str) -> None:
    assert heavy_modules_after(code) == []


def test_the_probe_sees_a_heavy_import_when_there_is_one() -> None:
    assert heavy_modules_after("import topx.icd") == ["torch"]


@pytest.mark.parametrize("code", [
    "from topx.cli import build_parser; build_parser()",
    "from topx.cli import main\ntry:\n    main(['demo', '--help'])\nexcept SystemExit:\n    pass",
    # Importing the offline package does not need its extra: offline() checks for it, then imports moto.
    "import topx.offline, topx.offline.demo",
])
def test_the_cli_and_the_offline_package_import_no_moto(code: str) -> None:
    assert heavy_modules_after(code, ("moto",)) == []


@pytest.mark.parametrize("code", ["import topx.contract", "import infra.settings"])
def test_the_deploy_contract_imports_no_numpy_torch_or_faiss(code: str) -> None:
    assert heavy_modules_after(code, NOT_IN_SYNTH) == []
