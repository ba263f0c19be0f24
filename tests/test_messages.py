"""What a user reads: an error from a DataLoader worker says its cause first, the
uneven='stop' warning comes once per loader (rank 0) at the user's line, MixedDataset's
weights as a dict and its documented interleaving, and mypy finds the installed package."""
from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from thread_world import run_all
from torch.utils.data import IterableDataset

import horovod_iter as hi

ROOT = Path(__file__).resolve().parents[1]


class Failing(IterableDataset):
    """Each DataLoader worker yields 3 samples, then raises our error with a URL and a fix."""

    def __iter__(self) -> Any:
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        yield from range(wid * 100, wid * 100 + 3)
        raise hi.ShardingError("shard https://data.example/s7.tar does not exist; fix: list "
                               "the shards again")


@pytest.mark.parametrize("workers", [0, 2])
def test_an_error_in_the_data_says_its_cause_first(workers: int) -> None:
    """With workers, torch's text starts "Caught ShardingError in DataLoader worker
    process 0" and ends with the cause; ours puts the cause on the first line, as with 0
    workers, and keeps the worker's traceback after it."""
    loader = hi.DistributedLoader(Failing(), batch_size=2, num_workers=workers,
                                  backend="local")
    with pytest.raises(hi.SampleError) as e:
        list(loader)
    first = str(e.value).split("\n")[0]
    assert "ShardingError: shard https://data.example/s7.tar does not exist; fix:" in first
    assert not first.startswith("Caught")
    if workers:
        assert "in DataLoader worker" in first
        assert "The worker's traceback:\nTraceback (most recent call last)" in str(e.value)


class Uneven(IterableDataset):
    """Rank 1 has 10 batches of 2, rank 0 has 2."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __iter__(self) -> Any:
        return iter(range(20 if self.rank == 1 else 4))


def test_stop_warns_once_per_loader_on_rank_0_at_the_users_line() -> None:
    def fn(b: Any) -> list[int]:
        loader = hi.DistributedLoader(Uneven(b.rank), batch_size=2, uneven="stop", backend=b)
        steps = []
        for epoch in range(3):
            loader.set_epoch(epoch)
            steps.append(sum(1 for _ in loader))  # the user's loop: the warning points here
        return steps

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_all(2, fn) == [[2, 2, 2]] * 2
    ours = [w for w in caught if "uneven='stop' ended" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert str(ours[0].message).startswith("rank 0:")
    assert "at least" in str(ours[0].message) and "uneven='pad'" in str(ours[0].message)
    assert Path(ours[0].filename).resolve() == Path(__file__).resolve(), ours[0].filename


def test_mixed_weights_as_a_dict_follow_the_sources_names() -> None:
    web, code = list(range(100)), list(range(1000, 1050))
    by_list = hi.MixedDataset({"web": web, "code": code}, weights=[3, 1])
    by_dict = hi.MixedDataset({"web": web, "code": code}, weights={"code": 1, "web": 3})
    assert by_dict.counts == by_list.counts == [113, 37]
    with pytest.raises(ValueError, match=r"one key per source name, \['web', 'code'\].*"
                                         r"weights=\[3, '\?'\]"):
        hi.MixedDataset({"web": web, "code": code}, weights={"web": 3, "books": 1})
    with pytest.raises(ValueError, match=r"in the sources' order \(\['web', 'code'\]\)"):
        hi.MixedDataset({"web": web, "code": code}, weights=[3])


def test_mixed_sources_interleave_under_the_loaders_shuffle_only() -> None:
    """MixedDataset(shuffle=False) orders each source's epoch; the loader's shuffling
    sampler (its default) mixes the sources in every batch; with the loader's
    shuffle=False the batches take one source's range after the other (documented)."""
    mix = hi.MixedDataset([list(range(100)), list(range(1000, 1100))], shuffle=False)
    mixed = [b.tolist() for b in hi.DistributedLoader(mix, batch_size=16, backend="local")]
    assert all(min(b) < 1000 <= max(b) for b in mixed[:-1])
    ordered = [i for b in hi.DistributedLoader(mix, batch_size=16, shuffle=False,
                                               backend="local") for i in b.tolist()]
    assert ordered == list(range(100)) + list(range(1000, 1100))


@pytest.mark.slow
def test_mypy_finds_the_installed_package(tmp_path: Path) -> None:
    """setup.sh installs the package editable in compat mode (a path in a .pth file), which
    mypy follows to horovod_iter and its py.typed."""
    pytest.importorskip("mypy")
    user = tmp_path / "user.py"
    user.write_text("import horovod_iter as hi\n\n"
                    "loader: hi.DistributedLoader = hi.DistributedLoader([1, 2], batch_size=1)\n"
                    "n: int = loader.batch_size\n")
    got = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", str(user)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert "import-not-found" not in got.stdout, got.stdout
    assert 'Incompatible types in assignment (expression has type "int | None"' in got.stdout
