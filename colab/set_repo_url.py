"""Sets the repository URL that the notebooks' install cell installs msad_jax from.

Every notebook in ``colab/`` starts with the same install cell (``tests/test_notebook_install.py``
checks that they are identical). When msad_jax is not importable in the runtime, the cell
installs it from ``SOURCE`` (an uploaded folder, .zip or wheel) or else from ``REPO_URL``, which
is empty until the repository is published. Once it is::

    python colab/set_repo_url.py https://github.com/OWNER/msad_jax

writes that URL into the install cell of every notebook (only the ``REPO_URL = ...`` line
changes) and, for a GitHub URL, prints each notebook's "Open in Colab" link and badge for the
README. Commit the notebooks afterwards.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
from collections.abc import Sequence

import nbformat

COLAB = pathlib.Path(__file__).resolve().parent
INSTALL_MARKER = "# Installs msad_jax"
_REPO_URL_LINE = re.compile(r'^REPO_URL = "[^"\n]*"', re.MULTILINE)
_GITHUB = re.compile(r"^(?:https://github\.com/|git@github\.com:)([\w.-]+)/([\w.-]+?)(?:\.git)?/?$")
BADGE = "https://colab.research.google.com/assets/colab-badge.svg"


def notebooks(folder: pathlib.Path = COLAB) -> list[pathlib.Path]:
    """The notebooks of ``folder``, sorted by name."""
    return sorted(folder.glob("*.ipynb"))


def install_cell(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The notebook's install cell (the code cell that starts with :data:`INSTALL_MARKER`).

    Raises:
      ValueError: there is none, or more than one.
    """
    cells = [
        c
        for c in notebook.cells
        if c.cell_type == "code" and c.source.lstrip().startswith(INSTALL_MARKER)
    ]
    if len(cells) != 1:
        found = len(cells)
        raise ValueError(
            f"expected one install cell starting with {INSTALL_MARKER!r}, found {found}"
        )
    return cells[0]


def check_url(url: str) -> str:
    """``url`` if pip can take it as ``git+URL`` inside the cell's string literal.

    Raises:
      ValueError: empty, or with whitespace, quotes or backslashes.
    """
    if not url or re.search(r"[\s\"'\\]", url):
        raise ValueError(f"{url!r} is not a usable repository URL (no spaces or quotes).")
    return url


def with_repo_url(source: str, url: str) -> str:
    """The install cell ``source`` with its ``REPO_URL`` set to ``url``.

    Raises:
      ValueError: ``source`` has no ``REPO_URL = "..."`` line.
    """
    if not _REPO_URL_LINE.search(source):
        raise ValueError('the install cell has no REPO_URL = "..." line.')
    return _REPO_URL_LINE.sub(f'REPO_URL = "{check_url(url)}"', source, count=1)


def colab_link(url: str, branch: str, notebook: str) -> str | None:
    """The Colab link of ``colab/<notebook>`` in a GitHub repository (None for other hosts)."""
    match = _GITHUB.match(url)
    if match is None:
        return None
    owner, repo = match.groups()
    return f"https://colab.research.google.com/github/{owner}/{repo}/blob/{branch}/colab/{notebook}"


def set_repo_url(url: str, paths: Sequence[pathlib.Path]) -> list[pathlib.Path]:
    """Writes ``url`` into the install cell of every notebook in ``paths``; returns the changed."""
    changed = []
    for path in paths:
        notebook = nbformat.read(path, as_version=nbformat.NO_CONVERT)
        cell = install_cell(notebook)
        source = with_repo_url(cell.source, url)
        if source != cell.source:
            cell.source = source
            nbformat.write(notebook, path)
            changed.append(path)
    return changed


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python colab/set_repo_url.py URL [--branch BRANCH]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "url", help="the repository's git URL, e.g. https://github.com/OWNER/msad_jax"
    )
    parser.add_argument("--branch", default="main", help="branch of the Colab links (main)")
    args = parser.parse_args(argv)
    try:
        changed = set_repo_url(args.url, notebooks())
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"REPO_URL set in {len(changed)} notebook(s): {', '.join(p.name for p in changed)}")
    for path in notebooks():
        link = colab_link(args.url, args.branch, path.name)
        if link:
            print(f"[![Open In Colab]({BADGE})]({link}) `colab/{path.name}`")


if __name__ == "__main__":
    main()
