"""A CI-sized soak: resources stay flat over many epochs (scripts/soak.py runs it longer)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from harness import ROOT, command, run

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.mark.parametrize("launcher", ["torch", "local"])
def test_resources_flat_over_many_epochs(launcher):
    nproc = 2 if launcher != "local" else 1
    with tempfile.TemporaryDirectory() as out:
        argv = [str(ROOT / "scripts/soak.py"), "--epochs", "24", "--samples", "512",
                "--workers", "2", "--quiet", "--report", out]
        res = run(command(launcher, nproc, argv), timeout=500)
        assert res.returncode == 0, res.stdout[-4000:]
        reports = [json.loads(f.read_text()) for f in sorted(Path(out).glob("rank*.json"))]
    assert len(reports) == nproc, res.stdout[-2000:]
    for r in reports:
        g = r["growth"]
        # after the warm-up epochs nothing accumulates: threads, fds and worker processes
        # return to the baseline every epoch, and memory does not creep
        # (an OS thread of torch/gloo may be caught mid-exit: at most one, never a trend)
        last, base = r["last"], r["baseline"]
        assert g["threads"] <= 0 and g["children"] <= 0, r
        assert g["os_threads"] <= 1 and last["os_threads"] <= base["os_threads"] + 1, r
        assert g["fds"] <= 2 and last["fds"] <= base["fds"], r
        assert g["rss_mb"] < 40, r
        assert r["last"]["children"] == r["baseline"]["children"] == 0, r
