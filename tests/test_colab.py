"""The Colab path: one repository URL (pyproject.toml) in every badge and setup cell, and the setup
cell run as Colab runs it: a fake ``google.colab`` module, the repository served from a local git
URL, a fresh directory and a fresh virtual environment; the cell clones, installs and imports
``trm_utils`` without touching torch (the index is switched off, so any download would fail)."""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import jupytext
import pytest

from trm_utils import colab
from trm_utils.run_all import NOTEBOOKS
from trm_utils.utils import REPO_ROOT


def test_every_notebook_points_at_the_pyproject_repository():
    slug = colab.repo_slug()
    for nb in NOTEBOOKS:
        text = (REPO_ROOT / "notebooks" / f"{nb}.py").read_text()
        assert colab.links_of(text) == {slug}, f"{nb}: run `make colab-links`"
        assert f"https://colab.research.google.com/github/{slug}/blob/main/notebooks/{nb}.ipynb" in text


def test_set_and_apply_rewrite_every_link(tmp_path):
    (tmp_path / "nb").mkdir()
    for nb in NOTEBOOKS[:2]:
        shutil.copy(REPO_ROOT / "notebooks" / f"{nb}.py", tmp_path / "nb" / f"{nb}.py")
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project.urls]\nRepository = "https://github.com/a/b"\n')
    colab.set_repo("my-lab/trm-fork", pyproject)
    assert colab.repo_slug(pyproject) == "my-lab/trm-fork"
    changed = colab.apply("my-lab/trm-fork", tmp_path / "nb", sync=False)
    assert len(changed) == 2
    for p in (tmp_path / "nb").glob("*.py"):
        assert colab.links_of(p.read_text()) == {"my-lab/trm-fork"}
    with pytest.raises(ValueError, match="OWNER/NAME"):
        colab.set_repo("not a slug", pyproject)


def _setup_cell() -> str:
    nb = jupytext.read(REPO_ROOT / "notebooks" / "01_leep.py")
    return next(c.source for c in nb.cells if c.cell_type == "code" and "google.colab" in c.source)


def test_colab_setup_cell_clones_installs_and_imports(tmp_path):
    # the repository as it is now (tracked and new files), served from a local git URL
    src = tmp_path / "served"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (REPO_ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / f, src / f)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "served"]):
        subprocess.run(git + cmd, cwd=src, check=True)
    # a fresh environment that sees this one's packages (torch, numpy, ...) but not trm_utils
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    py = venv / "bin" / "python"
    work = tmp_path / "colab"
    work.mkdir()
    script = tmp_path / "run_cell.py"
    script.write_text(
        "import sys, types, os\n"
        "sys.modules['google'] = types.ModuleType('google')\n"
        "sys.modules['google.colab'] = types.ModuleType('google.colab')\n"
        f"exec(compile({_setup_cell()!r}, 'setup-cell', 'exec'))\n"
        "import torch, trm_utils\n"
        "print('CWD', os.getcwd()); print('TRM', trm_utils.__file__); print('TORCH', torch.__file__, torch.__version__)\n")
    import torch

    env = {**os.environ, "TRM_REPO_URL": src.as_uri(), "PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    r = subprocess.run([str(py), str(script)], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    out = dict(line.split(" ", 1) for line in r.stdout.splitlines() if line.split(" ", 1)[0] in ("CWD", "TRM", "TORCH"))
    clone = work / "transfer-risk-map"
    assert (clone / ".git").is_dir() and Path(out["CWD"]) == clone / "notebooks"
    assert Path(out["TRM"]).resolve().is_relative_to(clone.resolve())  # imported from the clone
    assert out["TORCH"].split()[-1] == torch.__version__  # torch left alone
    assert Path(out["TORCH"].split()[0]).resolve() == Path(torch.__file__).resolve()
    # run again (a re-executed cell): no second clone, no error
    r2 = subprocess.run([str(py), str(script)], cwd=clone / "notebooks", env=env, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert not (clone / "notebooks" / "transfer-risk-map").exists()
