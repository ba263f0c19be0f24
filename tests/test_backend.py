from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from harness import command, launch, run, slow

import horovod_iter as hi
import horovod_iter.backend as hb

pytestmark = pytest.mark.timeout(300)


@pytest.mark.distributed
@pytest.mark.parametrize("launcher, nproc", [("horovod", 2), ("torch", 3), slow("horovod", 3),
                                             slow("torch", 2)])
def test_ranks_and_collectives(launcher: str, nproc: int) -> None:
    res = launch(launcher, nproc, "backend_facts.py")
    w = nproc
    for r, v in enumerate(res):
        assert v["name"] == launcher
        assert (v["rank"], v["size"]) == (r, w)
        assert (v["local_rank"], v["local_size"]) == (r, w)  # one host
        assert v["sum"] == v["async_sum"] == [w * (w + 1) // 2, 10 * w * (w + 1) // 2]
        assert v["min"] == [1, 10] and v["max"] == [w, 10 * w]
        assert v["input_untouched"] == [r + 1, 10 * (r + 1)]
        assert v["bcast"] == {"from": w - 1}
        assert v["gather"] == [i * i for i in range(w)]
        assert v["same_object"]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["horovod", "torch"])
def test_explicit_backend_matches_launch(launcher: str) -> None:
    res = launch(launcher, 2, "backend_facts.py", launcher)
    assert [v["name"] for v in res] == [launcher] * 2


@pytest.mark.distributed
@pytest.mark.slow
def test_env_override_forces_local_under_torchrun() -> None:
    res = launch("torch", 2, "backend_facts.py", env={"HOROVOD_ITER_BACKEND": "local"})
    assert [(v["name"], v["rank"], v["size"]) for v in res] == [("local", 0, 1)] * 2


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["horovod", "torch"])
def test_async_wait_times_out_instead_of_hanging(launcher: str) -> None:
    res = launch(launcher, 2, "timeout_wait.py", timeout=60)
    assert res[1] == {"rank": 1, "stalled": True}
    err = res[0]["error"]
    assert err is not None and "rank 0 of 2" in err and "the test op" in err and "1.0 s" in err
    assert 1.0 <= res[0]["waited"] < 60  # it ended (a generous margin, any machine load)


def test_local_backend_alone() -> None:
    b = hi.init()
    assert (b.name, b.rank, b.size, b.local_rank, b.local_size) == ("local", 0, 1, 0, 1)
    t = torch.tensor([3, 4])
    for op in ("sum", "min", "max"):
        assert b.allreduce(t, op).tolist() == [3, 4]
    h = b.allreduce_async(t)
    assert h.done() and h.wait(0.1).tolist() == [3, 4]
    assert b.broadcast_object("x") == "x" and b.allgather_object(5) == [5]
    b.barrier()
    assert hi.init() is b and hi.init("local") is b and hi.init("auto") is b


def test_plain_python_prints_local_rank() -> None:
    code = "import horovod_iter as hi; b = hi.init(); print(b.name, b.rank, b.size)"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "HOROVOD_RANK", "HOROVOD_ITER_BACKEND")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=60, check=True).stdout
    assert out.split() == ["local", "0", "1"]


def test_contradicting_backend_is_refused() -> None:
    hi.init("local")
    with pytest.raises(hi.BackendError, match="already initialised with the 'local' backend"):
        hi.init("torch")


def test_bad_backend_names() -> None:
    with pytest.raises(ValueError, match="'mpi'"):
        hi.init("mpi")
    with pytest.raises(TypeError):
        hi.init(3)  # type: ignore[arg-type]


def test_env_override_bad_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOROVOD_ITER_BACKEND", "nccl")
    with pytest.raises(ValueError, match="HOROVOD_ITER_BACKEND='nccl'"):
        hi.init()


def test_torch_backend_without_launch_says_how(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(hi.BackendError, match="torchrun --nproc_per_node"):
        hi.init("torch")


def test_auto_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK",
                "PMIX_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert hb._detect() == "local"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert hb._detect() == "torch"
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
    assert hb._detect() == "horovod"  # Horovod is installed in the test environment


def test_allreduce_rejects_float_and_bad_op() -> None:
    b = hi.init("local")
    with pytest.raises(TypeError, match="integer CPU tensor"):
        b.allreduce(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="'avg'"):
        b.allreduce(torch.tensor([1]), "avg")


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["horovod", "torch"])
def test_done_when_one_liner(launcher: str) -> None:
    """The issue's acceptance one-liner, verbatim in spirit, at 3 ranks."""
    code = "import horovod_iter as hi; b = hi.init(); print(b.name, b.rank, b.size)"
    if launcher == "horovod":
        cmd = command("horovod", 3, ["-c", code])
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=3", "--no-python", sys.executable, "-c", code]
    res = run(cmd, timeout=90, env={"PYTHONUNBUFFERED": ""})  # whole lines, not interleaved
    assert res.returncode == 0, res.stdout
    lines = sorted(ln.split(":")[-1].split() for ln in res.stdout.splitlines()
                   if ln.split(":")[-1].strip().startswith(launcher))
    assert lines == [[launcher, str(r), "3"] for r in range(3)], res.stdout


def test_gather_rows_alone_keeps_the_structure_and_refuses_other_values() -> None:
    t = torch.arange(6).reshape(3, 2)
    out = hi.gather_rows({"a": t, "b": (torch.zeros(0), torch.ones(3))})
    assert torch.equal(out["a"], t) and out["b"][0].shape == (0,)
    assert torch.equal(out["b"][1], torch.ones(3))
    with pytest.raises(TypeError, match="gather_rows: expected tensors"):
        hi.gather_rows([1, 2])
