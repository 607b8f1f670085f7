"""The docs build, cover every public name, and the README tells the truth."""

import os
import re
import subprocess
import sys

import keras_ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def test_mkdocs_builds_strictly(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
         str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_public_name_is_in_the_api_reference():
    api = read("docs", "api.md")
    missing = [name for name in keras_ckpt.__all__ if name not in api]
    assert missing == []


def test_every_checkpoint_argument_is_documented():
    import inspect

    documented = read("docs", "api.md") + read("docs", "checkpoint.md")
    params = inspect.signature(keras_ckpt.Checkpoint.__init__).parameters
    missing = [p for p in params if p != "self" and p not in documented]
    assert missing == []


def test_readme_quick_start_is_exactly_two_commands():
    readme = read("README.md")
    quick = readme.split("## Quick start", 1)[1].split("##", 1)[0]
    block = re.search(r"```bash\n(.*?)```", quick, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines()
                if line.strip()]
    assert commands == ["make demo", "make test"]
    makefile = read("Makefile")
    assert re.search(r"^demo:", makefile, re.M)
    assert re.search(r"^test:", makefile, re.M)
    assert read(".ci", "run").strip().splitlines()[-1] == "make test"


def test_readme_links_resolve():
    readme = read("README.md")
    for target in re.findall(r"\]\(((?:docs|examples)/[^)#]+)\)", readme):
        assert os.path.exists(os.path.join(ROOT, target)), target
