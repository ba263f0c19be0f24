"""Progress, stats logs, and the Horovod elastic handler registration (in one process)."""
from __future__ import annotations

import logging
import sys

import pytest
import torch
from torch.utils.data import TensorDataset

import horovod_iter as hi


def tds(n=100):
    return TensorDataset(torch.arange(n).float(), torch.arange(n))


def test_stats_figures_of_an_epoch():
    loader = hi.DistributedLoader(tds(), batch_size=8, shuffle=False)
    assert sum(len(b[1]) for b in loader) == 100
    s = loader.stats()
    assert s["steps"] == 13 and s["samples"] == 100 and s["padded_steps"] == 0
    assert 0 <= s["input_bound_fraction"] <= 1 and s["elapsed_s"] > 0
    assert s["sync_wait_s"] >= 0 and s["h2d_bytes"] == 0  # CPU: no copy


def test_stats_are_kept_when_a_pass_is_left_by_break_or_a_peek():
    loader = hi.DistributedLoader(tds(), batch_size=8, shuffle=False)
    assert loader.stats() == {}  # no pass yet
    for step, _ in enumerate(loader):
        if step == 2:
            break
    assert loader.stats()["steps"] == 3  # the iterator is gone; its figures stay
    next(iter(loader))
    s = loader.stats()
    assert s["steps"] == 1 and 0 <= s["input_bound_fraction"] <= 1


def test_progress_logs_without_tqdm_and_stats_at_epoch_end(caplog, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    caplog.set_level(logging.INFO, logger="horovod_iter")
    loader = hi.DistributedLoader(tds(), batch_size=8, progress=True)
    list(loader)
    msgs = [r.getMessage() for r in caplog.records if r.name == "horovod_iter"]
    steps = [m for m in msgs if ": step " in m]
    assert 5 <= len(steps) <= 13 and steps[-1].endswith("step 13/13")
    assert any("13 steps, 100 samples" in m and "input-bound" in m for m in msgs)


def test_progress_uses_tqdm_when_installed(capsys):
    pytest.importorskip("tqdm")
    loader = hi.DistributedLoader(tds(), batch_size=8, progress=True)
    list(loader)
    assert "13/13" in capsys.readouterr().err


def test_no_progress_no_output(capsys, caplog):
    caplog.set_level(logging.INFO, logger="horovod_iter")
    list(hi.DistributedLoader(tds(), batch_size=8))
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]


def test_elastic_handlers_registered_in_horovods_registry():
    state = pytest.importorskip("horovod.torch.elastic.state")
    from horovod_iter.integrations import horovod_elastic

    horovod_elastic.register()
    horovod_elastic.register()  # idempotent
    types = [t for t, _ in state.get_handler_registry()]
    assert types.count(hi.DistributedLoader) == 1 and types.count(hi.DistributedSampler) == 1
    loader = hi.DistributedLoader(tds(), batch_size=8, shuffle=False)
    handler = state._get_handler(loader)
    it = iter(loader)
    next(it), next(it)
    handler.save()                      # commit after 2 steps
    next(it), next(it)
    handler.restore()                   # roll back: the next batch is step 3 again
    assert next(iter(loader))[1].tolist() == list(range(16, 24))
