"""What the loader may call on a dataset, declared: the contract a dataset of your own
implements to get what `ShardedDataset` gets (resume, elastic resume, a canonical layout).

`sources.choose_source` picks one `Source` per dataset by these protocols, once; nothing
else in the library probes a dataset for optional methods.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = ["CanonicalLayout", "ElasticState", "Fingerprinted", "Stateful"]


@runtime_checkable
class Stateful(Protocol):
    """torchdata's protocol: an iterable dataset whose position can be saved and loaded.
    Inside the loader, each consumer (rank x DataLoader worker) saves its own; the loader
    gathers them, and resumes only on the same ranks x workers."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


@runtime_checkable
class ElasticState(Stateful, Protocol):
    """A `Stateful` iterable whose consumers' states merge into one state that resumes on
    any number of consumers (`ShardedDataset`). Set ``elastic_state = True`` on the class."""

    elastic_state: bool

    def set_world(self, num_replicas: int, rank: int) -> None: ...

    def merge_states(self, states: Sequence[Any], consumers: int, base: Any = None) -> Any:
        """One state from every consumer's (``None``: a consumer that handed nothing out),
        of a pass that resumed from ``base``."""
        ...


@runtime_checkable
class CanonicalLayout(Stateful, Protocol):
    """Streams whose global batches are the same on any world (``ShardedDataset(
    canonical_ranks=)``, `MixedStream`); the position is a count of global steps."""

    canonical: tuple[int, int] | None

    def set_world(self, num_replicas: int, rank: int) -> None: ...

    def set_batching(self, global_batch: int, drop_last: bool = False) -> None: ...

    def layout(self, world: int, workers: int, resume: Any = None) -> Any: ...

    def canonical_state(self, steps: int, base: Any, world: int, workers: int,
                        local: dict[int, Any]) -> Any: ...

    def step_batches(self) -> Iterator[list[Any]]: ...


@runtime_checkable
class Fingerprinted(Protocol):
    """A dataset that says what decides its samples (e.g. `MixedDataset`'s weights and
    lengths, `ShardedDataset`'s shard list and seed): the ranks compare it at every pass's
    start, and a saved state loads only into a dataset with the same one."""

    def fingerprint(self) -> str: ...
