"""The book builder: chapters from executed notebooks (never re-executed), links rewritten, a
landing page with run times, written atomically; a clear error without executed notebooks."""
import base64
import io
import json

import matplotlib.pyplot as plt
import nbformat
import pytest

from trm_utils.book import build_book, inline_external_images, rewrite_links

REPO = "https://github.com/o/n"


def _png() -> str:
    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _executed(path, text):
    nb = nbformat.v4.new_notebook()
    md = nbformat.v4.new_markdown_cell(text)
    code = nbformat.v4.new_code_cell("plot()", execution_count=1)
    code.outputs = [nbformat.v4.new_output("display_data", data={"image/png": _png(), "text/plain": "<Figure>"})]
    nb.cells = [md, code]
    nbformat.write(nb, path)


def test_build_book_from_executed_notebooks(tmp_path):
    run = tmp_path / "runs" / "main"
    run.mkdir(parents=True)
    _executed(run / "01_leep.ipynb", "# One\nSee [notebook 03](03_risk_maps.ipynb#Setup), [the tables](../reference/"
                                     "table1_iseg2019.csv) and [![Open In Colab](https://colab.research.google.com/a.svg)](https://x)")
    _executed(run / "03_risk_maps.ipynb", "# Three\nBack to [01](01_leep.ipynb).")
    (run / "stamps.json").write_text(json.dumps({"01_leep": {"stamp": "x", "seconds": 12.0}}))
    (run / "timings.json").write_text(json.dumps({"notebooks": {"03_risk_maps": 30.0}}))
    out = build_book(run, tmp_path / "book", repo=REPO, log=lambda *a: None)
    assert sorted(p.name for p in out.iterdir()) == [".nojekyll", "01_leep.html", "03_risk_maps.html", "index.html"]
    one = (out / "01_leep.html").read_text()
    assert 'href="03_risk_maps.html#Setup"' in one
    assert f'href="{REPO}/blob/main/reference/table1_iseg2019.csv"' in one
    assert "data:image/png;base64," in one  # the figure as executed, embedded
    assert "colab.research.google.com/a.svg" not in one and "Open In Colab" in one  # external image -> its alt text
    assert 'href="index.html"' in one and 'href="03_risk_maps.html">03_risk_maps' in one  # navigation
    index = (out / "index.html").read_text()
    assert "12 s" in index and "30 s" in index and 'href="01_leep.html"' in index
    # a second build replaces the first whole, leaving no temporary folder behind
    build_book(run, tmp_path / "book", repo=REPO, log=lambda *a: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["book", "runs"]


def test_no_executed_notebooks_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `make run` first"):
        build_book(tmp_path, tmp_path / "book", repo=REPO, log=lambda *a: None)
    assert not (tmp_path / "book").exists()


def test_link_rewriting_leaves_outside_links_alone():
    page = '<a href="https://example.org">x</a><a href="#top">t</a><a href="05_few_shot.ipynb">5</a>'
    assert rewrite_links(page, ["05_few_shot"], REPO) == \
        '<a href="https://example.org">x</a><a href="#top">t</a><a href="05_few_shot.html">5</a>'
    assert inline_external_images('<img src="data:image/png;base64,AA"/>') == '<img src="data:image/png;base64,AA"/>'
