"""The launcher wrappers in scripts/, single- and multi-node, with real processes."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from harness import _OUT_ENV, ROOT, WORKERS

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(out: str) -> dict[str, str]:
    env = {**os.environ, _OUT_ENV: out, "PYTHONUNBUFFERED": "1", "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def _results(out: str, n: int) -> list[dict]:
    return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(n)]


def _check_exact_cover(res: list[dict], n: int) -> None:
    seen = [i for r in res for b in r["batches"] for i in b]
    assert sorted(seen) == list(range(n)), "every sample exactly once over all ranks"
    assert len({len(r["batches"]) for r in res}) == 1, "every rank took the same steps"


CFG = json.dumps({"n": 101, "batch_size": 4, "uneven": "pad", "timeout": 60})


@pytest.mark.slow
def test_two_torchrun_nodes_on_one_machine_cover_the_data_disjointly():
    """Two torchrun launchers (--nnodes 2, c10d rendezvous on 127.0.0.1), 2 ranks each."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as out:
        env = _env(out)
        nodes = [subprocess.Popen(
            ["bash", str(ROOT / "scripts/run_torchrun.sh"), "--nnodes", "2", "--nproc", "2",
             "--rdzv", f"127.0.0.1:{port}", "--id", f"test{port}",
             str(WORKERS / "loader_run.py"), CFG],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True) for _ in range(2)]
        outputs = []
        try:
            for p in nodes:
                outputs.append(p.communicate(timeout=240)[0])
        finally:
            for p in nodes:
                if p.poll() is None:
                    os.killpg(p.pid, 9)
        assert [p.returncode for p in nodes] == [0, 0], "\n".join(outputs)[-6000:]
        res = _results(out, 4)
    assert [(r["size"], r["local_size"]) for r in res] == [(4, 2)] * 4
    assert all(r["error"] is None for r in res)
    _check_exact_cover(res, 101)


def _wrapper(script: str, args: list[str], nproc: int) -> list[dict]:
    """Run ``scripts/<script> *args loader_run.py CFG``; return each rank's report."""
    with tempfile.TemporaryDirectory() as out:
        p = subprocess.run(["bash", str(ROOT / "scripts" / script), *args,
                            str(WORKERS / "loader_run.py"), CFG],
                           cwd=ROOT, env=_env(out), capture_output=True, text=True, timeout=240)
        assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
        return _results(out, nproc)


def test_run_horovod_script_single_node():
    res = _wrapper("run_horovod.sh", ["-np", "2"], 2)
    assert [(r["backend"], r["size"], r["local_size"]) for r in res] == [("horovod", 2, 2)] * 2
    _check_exact_cover(res, 101)


@pytest.mark.slow
def test_run_horovod_script_two_hosts_without_ssh():
    """horovodrun runs hosts named localhost and 127.0.0.1 locally, no ssh: a real two-host
    job on one machine (one rank per host: local_size 1)."""
    res = _wrapper("run_horovod.sh", ["-np", "2", "-H", "localhost:1,127.0.0.1:1"], 2)
    assert [(r["backend"], r["size"], r["local_size"]) for r in res] == [("horovod", 2, 1)] * 2
    _check_exact_cover(res, 101)


def test_run_torchrun_script_single_node():
    res = _wrapper("run_torchrun.sh", ["--nproc", "3"], 3)
    assert [(r["backend"], r["size"]) for r in res] == [("torch", 3)] * 3
    _check_exact_cover(res, 101)


@pytest.mark.parametrize("script", ["run_horovod.sh", "run_torchrun.sh"])
def test_wrappers_refuse_a_missing_script_clearly(script):
    p = subprocess.run(["bash", str(ROOT / "scripts" / script)], capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 2 and "name the training script" in p.stderr
