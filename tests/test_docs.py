"""The docs render Markdown (MkDocs), not reST: docstrings carry no Sphinx roles."""
from __future__ import annotations

import re
from pathlib import Path

import horovod_iter

ROLE = re.compile(r":(class|func|meth|mod|attr|exc|data):`")


def test_no_sphinx_roles_in_docstrings():
    root = Path(horovod_iter.__file__).parent
    bad = [f"{p.relative_to(root)}:{n}" for p in root.rglob("*.py")
           for n, line in enumerate(p.read_text().splitlines(), 1) if ROLE.search(line)]
    assert not bad, f"Sphinx roles render raw on the docs site; use backticks: {bad}"
