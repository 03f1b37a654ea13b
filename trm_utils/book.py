"""The executed tutorial as a static HTML book, built from ``make run``'s notebooks, never re-executed.

    python -m trm_utils.book [--run runs/main] [--out runs/book]      (make book)

Tool: nbconvert's HTML exporter plus a generated landing page. It renders a notebook exactly as
executed (figures are embedded as data URIs, so they show offline), needs no network to build,
and is already in the Jupyter stack the kit uses (papermill, nbclient). Jupyter Book 1 would
add Sphinx and its theme for the same pages; mkdocs-jupyter adds mkdocs; mystmd downloads its
theme at build time and cannot build offline. The pages load MathJax from its CDN to typeset
the equations (the only request that leaves the site; without it the LaTeX source shows).

An image served from elsewhere (the Colab badge) becomes its alt text. Each chapter gets a navigation bar (contents, previous, next) and its links rewritten: a link
to another notebook (``03_risk_maps.ipynb``) points at that chapter's page, a link to a file of
the repository (``reference/...``, ``README.md``) at the file on GitHub (the one repository URL
in ``pyproject.toml``). The landing page says what the kit is, how to read the book and how long
each chapter took to run (``runs/<name>/timings.json``, ``stamps.json``). The book is written to
a temporary folder and renamed into place, so a failed build never leaves half a book.
"""
from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nbformat

from .colab import repo_slug
from .run_all import NOTEBOOKS
from .utils import REPO_ROOT, resolve_path

#: what each chapter teaches (the README's notebook table, in a sentence)
CHAPTERS = {
    "01_leep": "LEEP step by step on a classification problem, and LEEP against fine-tuned accuracy.",
    "02_pixel_leep": "The phantom (real anatomy, synthetic contrasts), pixel-LEEP, source U-Nets, and the "
                     "transferability map of each source-target pair (both readings of eq. 4).",
    "03_risk_maps": "From transferability map to hardness and transfer risk map; the two readings and the evidence for "
                    "each; the base; an interactive explorer.",
    "04_weighted_finetuning": "Vanilla, class-weight, Trs-map and TRM fine-tuning with a frozen encoder on a transfer "
                              "grid, per-run checks, gains, ablations and the paper's Fig. 2.",
    "05_few_shot": "The few-shot study (the paper's Table III) with a labelled subset per seed.",
    "06_transfer_cell": "One transfer cell, every method and seed: the unit a sweep executes.",
    "07_reproduce_paper": "The paper's Tables I-III regenerated from a sweep, beside the paper's numbers.",
}

CSS = """
body { margin: 0; }
nav.trm-nav { font-family: system-ui, sans-serif; background: #f3f4f6; border-bottom: 1px solid #d1d5db;
  padding: 0.5em 1.5em; display: flex; gap: 1.5em; align-items: center; font-size: 0.95em; }
nav.trm-nav.bottom { border-top: 1px solid #d1d5db; border-bottom: none; margin-top: 2em; }
nav.trm-nav a { color: #1d4ed8; text-decoration: none; }
nav.trm-nav .title { font-weight: 600; margin-right: auto; }
main.trm-landing { font-family: system-ui, sans-serif; max-width: 60em; margin: 2em auto; padding: 0 1.5em; line-height: 1.5; }
main.trm-landing table { border-collapse: collapse; width: 100%; }
main.trm-landing th, main.trm-landing td { border-bottom: 1px solid #e5e7eb; padding: 0.4em 0.6em; text-align: left;
  vertical-align: top; }
"""


def repo_url() -> str:
    """``https://github.com/OWNER/NAME`` from pyproject.toml (the one place the address lives)."""
    return f"https://github.com/{repo_slug()}"


def book_url(url: str = None) -> str:
    """Where GitHub Pages publishes the book of repository ``url``: ``https://OWNER.github.io/NAME/``."""
    m = re.fullmatch(r"https://github\.com/([^/]+)/([^/]+?)/?", url or repo_url())
    if not m:
        raise ValueError(f"{url!r} is not a GitHub repository URL (https://github.com/OWNER/NAME)")
    return f"https://{m.group(1).lower()}.github.io/{m.group(2)}/"


def rewrite_links(page: str, chapters: list, repo: str) -> str:
    """Links to notebooks -> their chapter pages; relative links to repository files -> GitHub."""
    def fix(m):
        attr, target = m.group(1), html.unescape(m.group(2))
        if re.match(r"^[a-z]+:|^#|^//|^data:", target):
            return m.group(0)
        path, _, anchor = target.partition("#")
        name = Path(path).name
        stem = name[:-len(".ipynb")] if name.endswith(".ipynb") else None
        if stem in chapters:
            new = f"{stem}.html" + (f"#{anchor}" if anchor else "")
        else:
            rel = re.sub(r"^(\.\./)+|^\./", "", path)
            if path.startswith("../") or (REPO_ROOT / rel).exists():
                new = f"{repo}/blob/main/{rel}" + (f"#{anchor}" if anchor else "")
            elif (REPO_ROOT / "notebooks" / rel).exists():
                new = f"{repo}/blob/main/notebooks/{rel}" + (f"#{anchor}" if anchor else "")
            else:
                return m.group(0)
        return f'{attr}="{html.escape(new, quote=True)}"'
    return re.sub(r'(href)="([^"]*)"', fix, page)


def inline_external_images(page: str) -> str:
    """An image served from elsewhere (a badge) becomes its alt text, so every page reads offline."""
    def fix(m):
        alt = re.search(r'alt="([^"]*)"', m.group(0))
        return f'<span class="trm-badge">{alt.group(1) if alt else "image"}</span>'
    return re.sub(r'<img\b[^>]*\bsrc="(?:https?:)?//[^"]*"[^>]*>', fix, page)


def _nav(chapters: list, i: int, bottom: bool = False) -> str:
    prev = f'<a href="{chapters[i - 1]}.html">&larr; {chapters[i - 1]}</a>' if i > 0 else ""
    nxt = f'<a href="{chapters[i + 1]}.html">{chapters[i + 1]} &rarr;</a>' if i + 1 < len(chapters) else ""
    return (f'<nav class="trm-nav{" bottom" if bottom else ""}"><span class="title">Transfer Risk Map tutorial · '
            f'{chapters[i]}</span><a href="index.html">Contents</a>{prev}{nxt}</nav>')


def _timings(run_dir: Path) -> dict:
    out = {}
    for name in ("stamps.json", "timings.json"):
        f = run_dir / name
        if f.exists():
            data = json.loads(f.read_text())
            for nb, v in (data.get("notebooks", data) if name == "timings.json" else data).items():
                out.setdefault(nb, v["seconds"] if isinstance(v, dict) else v)
    return out


def landing_page(chapters: list, timings: dict, repo: str, built: str, run_dir: Path) -> str:
    rows = "".join(
        f'<tr><td><a href="{c}.html">{c}</a></td><td>{html.escape(CHAPTERS.get(c, ""))}</td>'
        f'<td>{"%.0f s" % timings[c] if c in timings else "n/a"}</td></tr>' for c in chapters)
    total = sum(timings.get(c, 0) for c in chapters)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Transfer Risk Map: the executed tutorial</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>
<body><main class="trm-landing">
<h1>Transfer Risk Map: the executed tutorial</h1>
<p>A notebook-first tutorial and reproduction kit for <em>Transfer Risk Map: Mitigating Pixel-level Negative
Transfer in Medical Segmentation</em>: LEEP and its pixel-level version, transferability maps, the transfer risk
map, and risk-map-weighted fine-tuning of a 2D U-Net with a frozen encoder against vanilla, class-weight and
transferability-map baselines. Source, issues and the commands that reproduce every page:
<a href="{repo}">{repo}</a> (<a href="{repo}/blob/main/README.md">README</a>).</p>
<h2>How to read it</h2>
<p>Each chapter is one notebook, executed headless by <code>make run</code> on the embedded brain phantom
(real anatomy from the MNI152 template, synthetic contrasts, subjects and tumours) with its default parameters, on
2 CPU cores unless said otherwise; what you see is what that run printed and drew, never re-executed for this
book. Read the chapters in order: each builds on the one before. Every number comes with its seeds and spread;
where the method does not beat a baseline on this phantom, the chapter says so. To run a chapter yourself, open it
from the repository (its Colab badge, or <code>make run</code> for all of them); each ends with exercises that
check themselves.</p>
<h2>Chapters</h2>
<table><tr><th>chapter</th><th>what it teaches</th><th>run time</th></tr>{rows}</table>
<p>Run times add up to {total / 60:.1f} min (each chapter's own time; after 01 and 02 <code>make run</code> runs the
chapters two at a time, so it takes less).
Built {html.escape(built)} from <code>{html.escape(str(run_dir))}</code>.</p>
</main></body></html>
"""


def build_book(run_dir="runs/main", out="runs/book", repo: str = None, log=print) -> Path:
    """Render the executed notebooks of ``run_dir`` into a static site at ``out`` (see the module docstring)."""
    from nbconvert import HTMLExporter  # optional: `make book` installs it (the "book" extra); `make run` needs none

    run_dir, out = resolve_path(run_dir), resolve_path(out)
    chapters = [nb for nb in NOTEBOOKS if (run_dir / f"{nb}.ipynb").exists()]
    if not chapters:
        raise FileNotFoundError(f"no executed notebooks in {run_dir}; run `make run` first (it writes runs/main/*.ipynb)")
    missing = [nb for nb in NOTEBOOKS if nb not in chapters]
    if missing:
        log(f"note: {run_dir} lacks {', '.join(missing)}; the book has the other {len(chapters)} chapters")
    repo = repo or repo_url()
    exporter = HTMLExporter(template_name="lab")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".book-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a site is read by a web server
    try:
        for i, nb in enumerate(chapters):
            t0 = time.perf_counter()
            node = nbformat.read(run_dir / f"{nb}.ipynb", as_version=4)
            body, _ = exporter.from_notebook_node(node, resources={"metadata": {"name": nb}})
            body = inline_external_images(rewrite_links(body, chapters, repo))
            body = body.replace("</head>", f"<style>{CSS}</style></head>", 1)
            body = re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + _nav(chapters, i), body, count=1)
            body = body.replace("</body>", _nav(chapters, i, bottom=True) + "</body>", 1)
            (tmp / f"{nb}.html").write_text(body, encoding="utf-8")
            log(f"  {nb}.html ({len(body) / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s)")
        built = time.strftime("%Y-%m-%d %H:%M")
        shown = run_dir.relative_to(REPO_ROOT) if run_dir.is_relative_to(REPO_ROOT) else run_dir
        (tmp / "index.html").write_text(landing_page(chapters, _timings(run_dir), repo, built, shown), encoding="utf-8")
        (tmp / ".nojekyll").write_text("")  # GitHub Pages: serve the files as they are
        if out.exists():
            old = out.with_name(out.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/main", help="folder of executed notebooks (make run writes runs/main)")
    ap.add_argument("--out", default="runs/book", help="where the book is written")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = build_book(args.run, args.out)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"book: {out} ({size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s; open {out / 'index.html'}; "
          f"published at {book_url()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
