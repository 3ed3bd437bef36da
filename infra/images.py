"""Container image assets. Every image is built from the repository root so it can copy `topx/`.

Synthesis only stages the build context into cdk.out; images are built by `cdk deploy` (Docker needed
there, not for synth). The exclude lists keep the staged context small: the virtualenv, git history and
test data never reach it, and each image leaves out the code it does not run so a change elsewhere does
not rebuild it; `topx/offline` (the moto layer) never reaches an image. Patterns follow .dockerignore syntax
(CDK's default ignore mode for image assets).
"""

from __future__ import annotations

from aws_cdk import aws_ecr_assets as ecr_assets
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_lambda as lambda_

from infra.settings import REPO_ROOT

TRAIN_DOCKERFILE = "batch_jobs/train/Dockerfile"
SEARCH_DOCKERFILE = "batch_jobs/search/Dockerfile"
FUNCTIONS_DOCKERFILE = "functions/Dockerfile"

COMMON_EXCLUDE: tuple[str, ...] = (
    ".venv*",
    ".git",
    ".github",
    ".ci",
    ".gitignore",
    ".hypothesis",
    "Makefile",
    "README.md",
    # Each image installs its own pinned list (functions/requirements.txt, batch_jobs/requirements*.txt)
    # and copies the packages; the project itself is not pip-installed, so its metadata is not needed, and
    # the test environment's list (the root requirements.txt; the pattern matches at the root only) is not.
    "pyproject.toml",
    "requirements.txt",
    "cdk.out",
    "cdk.json",
    "cdk.context.json",
    "**/node_modules",
    "tests",
    # The offline AWS stand-ins (moto), for the tests and the demo: an optional extra nothing on AWS
    # imports. Left out here, where the context is staged, so the images' `COPY topx` does not ship it.
    "topx/offline",
    "benchmarks",
    "docs",
    "infra",
    "statemachine",
    "**/__pycache__",
    "**/*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    "*.egg-info",
    "build",
    "dist",
    "topx-out",
    "demo-out",
    ".whl",
    "**/*.parquet",
)
# What each image does not run, on top of COMMON_EXCLUDE.
BATCH_EXCLUDE = (*COMMON_EXCLUDE, "functions")
FUNCTIONS_EXCLUDE = (*COMMON_EXCLUDE, "batch_jobs")

# Lambda and the Batch instances are x86_64; pinning the platform keeps images built on an arm64
# laptop runnable there.
PLATFORM = ecr_assets.Platform.LINUX_AMD64


def _build_args(base_digest: str | None) -> dict[str, str] | None:
    """The Dockerfiles build FROM their BASE_IMAGE tag, or exactly the image BASE_DIGEST names of it."""
    return None if base_digest is None else {"BASE_DIGEST": base_digest}


def batch_image(dockerfile: str, base_digest: str | None = None) -> ecs.ContainerImage:
    return ecs.ContainerImage.from_asset(
        str(REPO_ROOT), file=dockerfile, exclude=list(BATCH_EXCLUDE), platform=PLATFORM,
        build_args=_build_args(base_digest),
    )


def function_code(handler: str, base_digest: str | None = None) -> lambda_.DockerImageCode:
    """The one functions image, started with ``handler`` (``functions.handlers.<name>``) as its CMD."""
    return lambda_.DockerImageCode.from_image_asset(
        str(REPO_ROOT),
        file=FUNCTIONS_DOCKERFILE,
        cmd=[handler],
        exclude=list(FUNCTIONS_EXCLUDE),
        platform=PLATFORM,
        build_args=_build_args(base_digest),
    )
