"""The docs build, cover every public name, and the README tells the truth."""

import html
import os
import re
import subprocess
import sys

import pytest

import keras_ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """`mkdocs build --strict` (the API reference is generated from the
    docstrings by mkdocstrings); returns the site directory."""
    site_dir = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
         str(site_dir)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return site_dir


def page_text(site, page):
    """The visible text of a built page."""
    with open(os.path.join(site, page, "index.html"), encoding="utf-8") as f:
        return html.unescape(re.sub(r"<[^>]+>", " ", f.read()))


def test_mkdocs_builds_strictly(site):
    assert os.path.exists(os.path.join(site, "api", "index.html"))


def test_api_reference_is_generated_from_the_docstrings(site):
    api = read("docs", "api.md")
    assert "::: keras_ckpt.Checkpoint" in api
    text = page_text(site, "api")
    # A sentence that exists only in the docstring reached the page.
    assert "Saves the complete training state and resumes it exactly" in text


def test_every_public_name_is_in_the_api_reference(site):
    text = page_text(site, "api")
    missing = [name for name in keras_ckpt.__all__
               if f"keras_ckpt.{name}" not in text]
    assert missing == []


def test_every_checkpoint_argument_is_documented(site):
    import inspect

    documented = page_text(site, "api") + read("docs", "checkpoint.md")
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


def python_blocks(*parts):
    """The ```python blocks of a docs page, in order."""
    return re.findall(r"```python\n(.*?)```", read(*parts), flags=re.S)


def test_writing_a_store_example_runs(tmp_path):
    """docs/custom-uploader.md ("Writing a store"): its setup block (the
    page's last), then its example, run as a user would paste them."""
    *examples, setup = python_blocks("docs", "custom-uploader.md")
    script = tmp_path / "store_example.py"
    script.write_text(setup + "\n" + "\n".join(examples))
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"),
               TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path,
                            capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "['ckpt-8', 'ckpt-16']" in lines
    assert any(line.startswith("Could not access mem://no-such-bucket/run-1."
                               " The bucket `no-such-bucket` does not exist.")
               for line in lines), result.stdout
