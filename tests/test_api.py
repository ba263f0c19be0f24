"""The public surface: the names of ``__all__`` (one way to do each thing), each documented, none
warning; the deprecated names of the last release still work, each warning at the user's line
with the name to use."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

import horovod_iter as hi
from horovod_iter.iterator import DistributedIterator
from horovod_iter.mixing import MixedStream
from horovod_iter.plan import EpochPlan

ROOT = Path(__file__).resolve().parents[1]

PUBLIC = {
    # ranks and collectives
    "init", "shutdown", "Backend", "gather_rows",
    # the pipeline and its parts
    "DistributedLoader", "DistributedSampler", "LengthGroupedBatchSampler", "CudaPrefetcher",
    "mask_labels", "flag_padding",
    # data
    "ShardedDataset", "MixedDataset", "MixedStream", "split_stream", "read_tar",
    # errors
    "HorovodIterError", "BackendError", "RankFailureError", "SampleError",
    "ConfigMismatchError", "DataTimeoutError", "OutOfRangeError", "UnevenDataError",
    "ShardingError",
}


def test_all_is_the_public_surface():
    assert set(hi.__all__) == PUBLIC
    assert len(hi.__all__) == len(PUBLIC) == 24
    for old in ("get_backend", "shard", "EpochPlan", "DistributedIterator"):
        assert old not in hi.__all__


def test_star_import_gives_all_and_nothing_warns():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ns: dict[str, object] = {}
        exec("from horovod_iter import *", ns)
        assert {k for k in ns if not k.startswith("__")} == PUBLIC
        assert all(getattr(hi, name) is ns[name] for name in PUBLIC)
        assert hi.DistributedIterator is DistributedIterator  # a type to annotate with


def test_every_public_name_is_in_the_api_reference():
    api = (ROOT / "docs" / "api.md").read_text()
    documented = set(re.findall(r"^::: horovod_iter\.(\w+)$", api, re.M))
    assert PUBLIC <= documented
    # what iter(loader) returns, and the module of the dataset contract
    assert documented - PUBLIC == {"DistributedIterator", "protocols"}


def _stream_sources():
    def read(path):
        return iter(range(4))

    return {name: hi.ShardedDataset([f"{name}0", f"{name}1"], read, sizes=[4, 4], seed=j,
                                    canonical_ranks=2, rank=0, num_replicas=1)
            for j, name in enumerate("ab")}


def test_the_new_names_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hi.init() is hi.init()
        assert list(hi.split_stream(range(10), rank=1, num_replicas=3)) == [1, 4, 7]
        mix = hi.MixedStream(_stream_sources(), weights=[0.5, 0.5], samples_per_epoch=8,
                             rank=0, num_replicas=1)
        assert isinstance(mix, MixedStream)
        maps = hi.MixedDataset([list(range(3)), list(range(5))])
        assert type(maps) is hi.MixedDataset
        loader = hi.DistributedLoader(TensorDataset(torch.arange(4)), batch_size=2)
        it = iter(loader)
        assert isinstance(it, hi.DistributedIterator)
        it.close()


def _warned(record, new):
    """The one DeprecationWarning of ``record``: it names ``new`` and points at this file."""
    deps = [w for w in record if issubclass(w.category, DeprecationWarning)]
    assert len(deps) == 1, [str(w.message) for w in record]
    assert new in str(deps[0].message) and "removed in horovod_iter 0.4" in str(deps[0].message)
    assert deps[0].filename == __file__  # at the user's line, not inside the library
    return deps[0]


def test_get_backend_warns_and_returns_inits_backend():
    with pytest.warns(DeprecationWarning) as record:
        b = hi.get_backend()
    _warned(record, "horovod_iter.init()")
    assert b is hi.init()


def test_shard_warns_and_is_split_stream():
    with pytest.warns(DeprecationWarning) as record:
        out = list(hi.shard(range(10), rank=1, num_replicas=3))
    _warned(record, "horovod_iter.split_stream()")
    assert out == list(hi.split_stream(range(10), rank=1, num_replicas=3)) == [1, 4, 7]


def test_epoch_plan_leaves_the_api_but_imports_with_a_warning():
    with pytest.warns(DeprecationWarning) as record:
        cls = hi.EpochPlan
    _warned(record, "horovod_iter.plan.EpochPlan")
    assert cls is EpochPlan
    with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
        hi.NoSuchName  # noqa: B018


def test_mixed_dataset_of_streams_warns_and_makes_the_mixed_stream():
    srcs = _stream_sources()
    with pytest.warns(DeprecationWarning) as record:
        mix = hi.MixedDataset(srcs, weights=[0.5, 0.5], samples_per_epoch=8, rank=0,
                              num_replicas=1)
    _warned(record, "horovod_iter.MixedStream(")
    assert isinstance(mix, MixedStream)
    new = hi.MixedStream(srcs, weights=[0.5, 0.5], samples_per_epoch=8, rank=0,
                         num_replicas=1)
    assert mix.fingerprint() == new.fingerprint()
