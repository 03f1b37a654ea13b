"""The repository's URL in one place (``pyproject.toml``'s ``[project.urls] Repository``) and the
command that writes it into every notebook's Colab badge and setup cell.

    python -m trm_utils.colab show                 # the URL and whether every notebook agrees
    python -m trm_utils.colab set OWNER/NAME       # set it in pyproject.toml, then rewrite the notebooks
    python -m trm_utils.colab apply                # rewrite the notebooks from pyproject.toml

(``make colab-links REPO=owner/name`` runs ``set``.) The ``.py`` sources are rewritten and
each ``.ipynb`` is regenerated from its ``.py`` by jupytext, outputs stripped.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from jupytext.cli import jupytext as jupytext_cli

from .utils import REPO_ROOT, atomic_write_text

PYPROJECT = REPO_ROOT / "pyproject.toml"
NOTEBOOKS = REPO_ROOT / "notebooks"
_URL_LINE = re.compile(r'^(Repository\s*=\s*")https://github\.com/([^"/]+/[^"/]+)(")', re.MULTILINE)
_BADGE = re.compile(r"https://colab\.research\.google\.com/github/[^/\s)]+/[^/\s)]+/blob/main/notebooks/")
_SETUP = re.compile(r'^REPO_URL = "https://github\.com/[^"]+"', re.MULTILINE)
_SLUG = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")


def repo_slug(pyproject: Path = PYPROJECT) -> str:
    """``owner/name`` from ``[project.urls] Repository = "https://github.com/owner/name"``."""
    m = _URL_LINE.search(pyproject.read_text())
    if not m:
        raise ValueError(f'{pyproject} has no [project.urls] line Repository = "https://github.com/OWNER/NAME"; add one')
    return m.group(2)


def rewrite_text(text: str, slug: str) -> str:
    """A notebook source with its Colab badge and its setup cell's ``REPO_URL`` pointing at ``slug``."""
    text = _BADGE.sub(f"https://colab.research.google.com/github/{slug}/blob/main/notebooks/", text)
    return _SETUP.sub(f'REPO_URL = "https://github.com/{slug}"', text)


def notebook_sources(folder: Path = NOTEBOOKS) -> list:
    return sorted(folder.glob("[0-9][0-9]_*.py"))


def links_of(text: str) -> set:
    """Every repository slug a notebook source names (badge and setup cell)."""
    badges = {m.group(0).split("/github/")[1].split("/blob/")[0] for m in _BADGE.finditer(text)}
    setups = {m.group(0).split("github.com/")[1].rstrip('"') for m in _SETUP.finditer(text)}
    return badges | setups


def apply(slug: str = None, folder: Path = NOTEBOOKS, sync: bool = True) -> list:
    """Rewrite every notebook's badge and setup cell to ``slug`` (default: pyproject's) and
    regenerate the ``.ipynb`` pairs. Returns the notebooks changed."""
    slug = slug or repo_slug()
    changed = []
    for py in notebook_sources(folder):
        old = py.read_text()
        new = rewrite_text(old, slug)
        if new != old:
            atomic_write_text(py, new)
            changed.append(py.name)
        if sync and new != old:  # jupytext's own sync: cell ids and metadata of the pair are kept
            jupytext_cli(["--sync", "--quiet", str(py)])
    return changed


def set_repo(slug: str, pyproject: Path = PYPROJECT) -> None:
    """Write ``https://github.com/<slug>`` into ``pyproject.toml``'s ``[project.urls]``."""
    if not _SLUG.match(slug):
        raise ValueError(f"repository {slug!r} is not of the form OWNER/NAME (e.g. my-lab/transfer-risk-map)")
    text = pyproject.read_text()
    if not _URL_LINE.search(text):
        raise ValueError(f'{pyproject} has no [project.urls] line Repository = "https://github.com/OWNER/NAME"; add one')
    atomic_write_text(pyproject, _URL_LINE.sub(lambda m: f"{m.group(1)}https://github.com/{slug}{m.group(3)}", text))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trm_utils.colab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("show")
    s = sub.add_parser("set")
    s.add_argument("slug", metavar="OWNER/NAME")
    sub.add_parser("apply")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "set":
            set_repo(args.slug)
        if args.cmd in ("set", "apply"):
            changed = apply()
            print(f"repository {repo_slug()}: rewrote {', '.join(changed) if changed else 'nothing (already current)'}")
            return 0
        slug = repo_slug()
        bad = {p.name: links_of(p.read_text()) for p in notebook_sources() if links_of(p.read_text()) != {slug}}
        print(f"repository {slug} (pyproject.toml)")
        for name, links in bad.items():
            print(f"  {name} points at {sorted(links)}: run make colab-links")
        return 1 if bad else 0
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
