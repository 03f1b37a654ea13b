"""The book's GitHub Pages workflow: valid against the GitHub workflow schema (checked offline with
check-jsonschema's vendored schema), and it runs what the README says it runs."""
import subprocess
import sys

import pytest
import yaml

from trm_utils.book import book_url
from trm_utils.utils import REPO_ROOT

WORKFLOW = REPO_ROOT / ".github" / "workflows" / "book.yml"


def lint(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows",
                           str(path)], capture_output=True, text=True, timeout=120)


def test_workflow_is_valid_and_builds_the_book():
    r = lint(WORKFLOW)
    assert r.returncode == 0, r.stdout + r.stderr
    wf = yaml.safe_load(WORKFLOW.read_text())
    assert wf[True]["push"]["branches"] == ["main"]  # YAML reads the key `on` as True
    steps = [s.get("run", "") + s.get("uses", "") for s in wf["jobs"]["build"]["steps"]]
    assert any("make run" in s for s in steps) and any("make book" in s for s in steps)
    assert any(s.startswith("actions/upload-pages-artifact") for s in steps)
    assert wf["jobs"]["deploy"]["steps"][0]["uses"].startswith("actions/deploy-pages")


def test_the_linter_catches_a_broken_workflow(tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text(WORKFLOW.read_text().replace("runs-on: ubuntu-latest", "runs_on: ubuntu-latest", 1))
    assert lint(broken).returncode != 0


def test_book_url_from_the_repository_url():
    assert book_url("https://github.com/Trm-Tutorial/transfer-risk-map") == "https://trm-tutorial.github.io/transfer-risk-map/"
    with pytest.raises(ValueError, match="not a GitHub repository URL"):
        book_url("https://gitlab.com/a/b")
