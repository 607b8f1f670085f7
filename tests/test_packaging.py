"""The package builds, passes `twine check`, and installs and runs from its wheel.

keras_ckpt is not on PyPI yet: README.md tells users to `make dist` and install
the wheel, or to install from the clone. These tests do what `make dist` does
(`python -m build`, then `twine check`) and install the wheel into a fresh
venv. The venv gets the wheel without TensorFlow (`--no-deps`) plus the small
base dependencies: `import keras_ckpt` and the CLI's listing commands do not
import TensorFlow, so they must work without it.
"""

import email
import os
import re
import subprocess
import sys
import tarfile
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "src", "keras_ckpt")

# What `import keras_ckpt` and `keras-ckpt ls` need, TensorFlow aside.
BASE_DEPS_WITHOUT_TENSORFLOW = ["numpy", "google-crc32c", "tqdm"]


def run(*args, expect=0, **kwargs):
    # PYTHONPATH points at src/ when the suite runs from a worktree: the
    # installed wheel, not the source tree, must answer.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(args, capture_output=True, text=True, env=env,
                            timeout=600, **kwargs)
    assert result.returncode == expect, (
        f"{' '.join(map(str, args))} exited {result.returncode}:\n"
        f"{result.stdout}\n{result.stderr}")
    return result


def read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """`python -m build` as `make dist` runs it: the sdist, then the wheel
    built from the sdist (so a file the build needs but the sdist lacks
    fails here). Returns (sdist path, wheel path)."""
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--quiet", "--outdir", str(out), ROOT)
    sdists = list(out.glob("keras_ckpt-*.tar.gz"))
    wheels = list(out.glob("keras_ckpt-*-py3-none-any.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, os.listdir(out)
    return sdists[0], wheels[0]


def wheel_metadata(wheel):
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist()
                    if n.endswith(".dist-info/METADATA"))
        return email.message_from_bytes(zf.read(name))


@pytest.mark.slow
def test_wheel_holds_every_module_and_no_tests_or_benchmarks(dist):
    _, wheel = dist
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    modules = {
        os.path.relpath(os.path.join(folder, f), os.path.dirname(SRC))
        .replace(os.sep, "/")
        for folder, _, files in os.walk(SRC) for f in files
        if f.endswith(".py")}
    assert modules and modules <= names, sorted(modules - names)
    stray = [n for n in names
             if n.split("/")[0] in ("tests", "benchmarks", "examples", "docs")]
    assert stray == []


@pytest.mark.slow
def test_sdist_has_what_a_build_needs_and_no_half_test_suite(dist):
    sdist, _ = dist
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    needed = {"pyproject.toml", "README.md", "src/keras_ckpt/__init__.py"}
    needed |= {f for f in ("LICENSE", "LICENSE.txt")
               if os.path.exists(os.path.join(ROOT, f))}
    assert needed <= names, sorted(needed - names)
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


@pytest.mark.slow
def test_twine_check_passes(dist):
    result = run(sys.executable, "-m", "twine", "check", "--strict", *dist)
    assert result.stdout.count("PASSED") == 2, result.stdout


@pytest.mark.slow
def test_wheel_metadata_names_the_cli_and_the_extras(dist):
    _, wheel = dist
    meta = wheel_metadata(wheel)
    assert meta["Name"] == "keras-ckpt"
    extras = set(meta.get_all("Provides-Extra"))
    assert {"s3", "gcs", "azure", "all", "tensorboard", "dist"} <= extras
    assert any(re.match(r"tensorboard\b.*extra == \"tensorboard\"", r)
               for r in meta.get_all("Requires-Dist")), meta.get_all("Requires-Dist")
    with zipfile.ZipFile(wheel) as zf:
        entry_points = zf.read(next(n for n in zf.namelist()
                                    if n.endswith("entry_points.txt"))).decode()
    assert "keras-ckpt = keras_ckpt.cli:main" in entry_points


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_the_cli_runs(dist, tmp_path):
    _, wheel = dist
    venv = tmp_path / "venv"
    # Without pip of its own (ensurepip costs ~10 s): this pip installs into
    # it. The three base dependencies have no dependencies of their own.
    run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    python = str(venv / "bin" / "python")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet",
        "--disable-pip-version-check", "--no-deps", str(wheel),
        *BASE_DEPS_WITHOUT_TENSORFLOW)

    imported = run(python, "-c",
                   "import sys, keras_ckpt; print(keras_ckpt.__file__); "
                   "print('tensorflow' in sys.modules)", cwd=tmp_path)
    where, tensorflow_loaded = imported.stdout.split()
    assert where.startswith(str(venv)), where  # the wheel, not src/
    assert tensorflow_loaded == "False"

    cli = str(venv / "bin" / "keras-ckpt")
    assert "usage: keras-ckpt" in run(cli, "--help").stdout
    empty = tmp_path / "no-checkpoints"
    empty.mkdir()
    # docs/cli.md: "An empty directory or prefix prints `No checkpoints in
    # ...` and exits 0".
    assert "No checkpoints in" in run(cli, "ls", str(empty)).stdout
    run(cli, "ls", str(tmp_path / "absent"), expect=1)


def test_readme_install_lines_work_before_pypi():
    """keras-ckpt is not on PyPI yet: the README says so and installs from
    the clone or from the wheel `make dist` builds, and does not tell users
    to `pip install keras-ckpt`."""
    readme = read("README.md")
    assert "not on PyPI yet" in readme
    assert re.search(r"^pip install \./keras_ckpt\b", readme, re.M)
    version = re.search(r'^version = "([^"]+)"', read("pyproject.toml"), re.M)
    wheel = re.escape(f"dist/keras_ckpt-{version.group(1)}-py3-none-any.whl")
    assert re.search(rf"^pip install \S*{wheel}", readme, re.M)
    assert re.search(r"^make -C keras_ckpt dist\b", readme, re.M)
    assert re.search(r"^dist:", read("Makefile"), re.M)
    assert not re.search(r"^\s*pip install '?keras-ckpt\b", readme, re.M)


def test_tensorboard_page_names_the_extra_that_installs_tensorboard():
    pyproject = read("pyproject.toml")
    assert re.search(r'^tensorboard = \["tensorboard\b', pyproject, re.M)
    page = read("docs", "tensorboard.md")
    assert re.search(r"^pip install '\./keras_ckpt\[tensorboard\]'", page, re.M)
    assert "TBNotInstalledError" in page  # what a user without it sees
