"""Launch N real ranks under horovodrun or torchrun, with a hard timeout, and collect results.

A worker script reports a JSON-able value with :func:`report`; :func:`launch` returns the
values ordered by rank. Every distributed test in this suite goes through here.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def slow(*values: Any) -> Any:
    """A parametrize case that runs only with ``-m slow`` (or ``-m "slow or not slow"``):
    launched tests beyond one per family and launcher, whose semantics are tested in-process
    on the thread world (tests/test_inproc_*.py). pytest is imported here, not at the top:
    the launched workers import this module too."""
    import pytest

    return pytest.param(*values, marks=pytest.mark.slow)


WORKERS = Path(__file__).resolve().parent / "workers"
_OUT_ENV = "HOROVOD_ITER_TEST_OUT"
LAUNCHERS = ("horovod", "torch")


class LaunchError(AssertionError):
    """The launched job failed or timed out; carries its output."""

    def __init__(self, message: str, output: str, returncode: int | None) -> None:
        super().__init__(f"{message}\n----- output -----\n{output[-8000:]}")
        self.output = output
        self.returncode = returncode


def _rank_from_env() -> int:
    for var in ("HOROVOD_RANK", "RANK", "OMPI_COMM_WORLD_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def report(value: Any, rank: int | None = None) -> None:
    """Called by a worker: record this rank's result (JSON-serialisable)."""
    out = os.environ.get(_OUT_ENV)
    if out is None:
        print(json.dumps(value))
        return
    r = _rank_from_env() if rank is None else rank
    tmp = Path(out) / f".rank{r}.json.tmp"
    tmp.write_text(json.dumps(value))
    tmp.rename(Path(out) / f"rank{r}.json")


def command(launcher: str, nproc: int, argv: Sequence[str]) -> list[str]:
    """The launch command line for ``argv`` (a Python script and its args) on ``nproc`` ranks."""
    bindir = Path(sys.executable).parent
    if launcher == "horovod":
        hr = bindir / "horovodrun"
        head = [str(hr)] if hr.exists() else ["horovodrun"]
        return [*head, "-np", str(nproc), "-H", f"localhost:{nproc}", "--gloo",
                sys.executable, *argv]
    if launcher == "torch":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}", *argv]
    if launcher == "local":
        return [sys.executable, *argv]
    raise ValueError(f"launcher must be one of {(*LAUNCHERS, 'local')}, got {launcher!r}")


def run(cmd: Sequence[str], timeout: float, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in its own process group; kill the whole group after ``timeout`` s."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    paths = [str(ROOT), str(ROOT / "tests")]
    if full_env.get("PYTHONPATH"):
        paths.append(full_env["PYTHONPATH"])
    full_env["PYTHONPATH"] = os.pathsep.join(paths)
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=full_env, cwd=str(cwd or ROOT), start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as e:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise LaunchError(f"timed out after {timeout} s: {' '.join(cmd)}", out, None) from e
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, None)


def launch(launcher: str, nproc: int, script: str, *args: Any, timeout: float = 90,
           env: dict[str, str] | None = None, expect_fail: bool | None = False) -> list[Any]:
    """Run ``tests/workers/<script>`` on ``nproc`` ranks; return each rank's reported value.

    Raises LaunchError if the job fails (unless ``expect_fail``), times out, or a rank
    reported nothing. With ``expect_fail`` the values of the ranks that reported are returned
    (None for the others) and the output is attached as ``launch.last_output``.
    """
    with tempfile.TemporaryDirectory(prefix="hi-test-") as out:
        argv = [str(WORKERS / script), *map(str, args)]
        res = run(command(launcher, nproc, argv), timeout, {**(env or {}), _OUT_ENV: out})
        launch.last_output = res.stdout  # type: ignore[attr-defined]
        if expect_fail is None:  # either outcome is fine; the values are checked
            pass
        elif res.returncode != 0 and not expect_fail:
            raise LaunchError(f"{launcher} job failed with exit code {res.returncode}",
                              res.stdout, res.returncode)
        elif expect_fail and res.returncode == 0:
            raise LaunchError(f"{launcher} job was expected to fail but succeeded",
                              res.stdout, res.returncode)
        values: list[Any] = []
        for r in range(nproc):
            f = Path(out) / f"rank{r}.json"
            if not f.exists():
                if expect_fail or expect_fail is None:
                    values.append(None)
                    continue
                raise LaunchError(f"rank {r} reported no result", res.stdout, res.returncode)
            values.append(json.loads(f.read_text()))
        return values
