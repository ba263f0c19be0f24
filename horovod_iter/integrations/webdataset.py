"""WebDataset tar shards through `ShardedDataset`: each shard read once over the world by the
``webdataset`` package itself, resumable on any world size.

WebDataset splits its shard list by node and by DataLoader worker; `ShardedDataset` deals the
shards to the (rank x worker) consumers already, so the reader opens one shard with no
splitting of its own (``nodesplitter=None, workersplitter=None``) and applies your pipeline
stages. Splitting twice (``hi.shard`` over a WebDataset pipeline that splits) would lose most
of the data: `horovod_iter.shard` refuses a WebDataset pipeline with `ShardingError`.

Example:
    ```python
    import horovod_iter as hi
    from horovod_iter.integrations.webdataset import reader

    read = reader(lambda ds: ds.decode("torchrgb").to_tuple("jpg", "cls"))
    data = hi.ShardedDataset(sorted(glob("train-*.tar")), read, seed=0)
    loader = hi.DistributedLoader(data, batch_size=64, num_workers=4, uneven="pad")
    ```
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any, Callable

__all__ = ["WebDatasetReader", "reader"]


class WebDatasetReader:
    """``read(url, start=0)`` for `ShardedDataset`: the samples of one tar shard, through
    ``webdataset.WebDataset`` and ``stages``, from the ``start``-th on (picklable when the
    stages are, e.g. module-level functions)."""

    def __init__(self, *stages: Callable[[Any], Any], **webdataset_kwargs: Any) -> None:
        self.stages = stages
        self.kwargs = webdataset_kwargs

    def __call__(self, url: str, start: int = 0) -> Iterator[Any]:
        import webdataset as wds

        ds: Any = wds.WebDataset(url, shardshuffle=False, nodesplitter=None,
                                 workersplitter=None, empty_check=False, **self.kwargs)
        for stage in self.stages:
            ds = stage(ds)
        samples: Iterable[Any] = ds
        return itertools.islice(iter(samples), start, None)


def reader(*stages: Callable[[Any], Any], **webdataset_kwargs: Any) -> WebDatasetReader:
    """A `ShardedDataset` reader of WebDataset tar shards; ``stages`` map the
    ``webdataset.WebDataset`` of one shard (``.decode()``, ``.to_tuple(...)``, ``.map(...)``)."""
    return WebDatasetReader(*stages, **webdataset_kwargs)
