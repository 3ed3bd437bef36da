"""Settings every test module shares.

Tests live by kind: ``unit/`` (topx alone), ``aws/`` (the store, stages and client against moto),
``offline/`` (the state machine under the offline AWS layer), ``infra/`` (the CDK app, cdk-nag, checkov,
the ASL). Their shared helpers (``reliability_stack``, ``isolated_env``, ``oracle/``, ``checkov/``) stay
in this folder, which is put on the import path here.

Hypothesis draws its examples from a fixed seed (``derandomize``) and keeps no database of past
failures, so a property test's outcome is the same on every run and every machine: a failure found once
is a failure every time, and CI never goes red on a draw that a rerun turns green. To hunt for new
counterexamples, run with ``HYPOTHESIS_PROFILE=explore`` (fresh random draws, ten times as many); add
what it finds as an ``@example`` so the fixed runs keep it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).resolve().parent))

settings.register_profile("fixed", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False, database=None, max_examples=1500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fixed"))


@pytest.fixture(scope="session")
def default_app(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path]:
    """The CDK app with the default context, synthesized once for every test that reads it:
    (app, stack, outdir). cdk-nag's AwsSolutions checks run during synthesis; a finding fails here."""
    from infra.app import build_app

    outdir = tmp_path_factory.mktemp("synth-default")
    app, stack = build_app(context=None, outdir=str(outdir))
    app.synth()
    return app, stack, outdir


def pytest_collection_modifyitems(config, items) -> None:  # noqa: ANN001 (pytest's hook signature)
    """Every test under offline/ runs whole state machine executions, seconds each: they are slow.
    Elsewhere a test is marked where it is slow (an isolated environment, a benchmark run)."""
    offline = Path(__file__).resolve().parent / "offline"
    for item in items:
        if offline in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def chromium() -> str:
    """The headless browser the report tests render with. Where it is missing it is installed (Debian's
    ``chromium``; ``make test`` installs it too); when that fails the tests are skipped on a developer's
    machine, but fail under CI (CI=true), so that CI never passes without having rendered the pages."""
    import shutil
    import subprocess

    from chromium import chromium_binary

    found = chromium_binary()
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        found = chromium_binary()
    if found is None:
        message = "chromium is not installed (apt-get install -y chromium)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + ": CI must render the report")
        pytest.skip(message)
    return found
