"""The documentation: the site builds with ``mkdocs build --strict`` (no broken link, anchor or API entry) and
README stays a short front page."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_site_builds_strictly(tmp_path) -> None:
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          capture_output=True, text=True, cwd=REPO, env=os.environ | {"NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "synthetic_set" in api and "SynthesisOptions" in api  # mkdocstrings rendered the docstrings


def test_readme_is_a_short_front_page() -> None:
    readme = (REPO / "README.md").read_text()
    assert readme.splitlines()[:5] == ["# patchdd", "", "```", "make demo", "make test"]
    assert len(readme.splitlines()) < 200
    for page in ("docs/getting-started.md", "docs/methods/index.md", "docs/recipes.md", "LICENSE", "CITATION.cff"):
        assert f"({page})" in readme and (REPO / page).is_file(), page
