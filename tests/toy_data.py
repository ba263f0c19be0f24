"""Small datasets shared by the tests and their launched workers."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.data import Dataset


class Ids(Dataset):
    """Sample ``i`` is ``tensor(i)``: batches show exactly which samples they hold."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(i)


class Mapped(Dataset):
    """Sample ``i`` is ``make(i)``: a dataset of any sample structure, ids recoverable."""

    def __init__(self, n: int, make: Callable[[int], Any]) -> None:
        self.n, self.make = n, make

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        return self.make(i)


class Named:
    """``n`` samples ``"<name>:<i>"``: a source whose samples say where they came from."""

    def __init__(self, name, n):
        self.name, self.n = name, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return f"{self.name}:{i}"


def take(it: Any, mode: str) -> Any:
    """The next batch of a pass through the API ``mode`` names (``next``, ``get_next``,
    ``optional``), or None at the end of data."""
    import horovod_iter as hi

    if mode == "get_next":
        try:
            return it.get_next()
        except hi.OutOfRangeError:
            return None
    if mode == "optional":
        return it.get_next_as_optional()
    return next(it, None)


def record(batch: Any, cfg: dict, out: dict) -> None:
    """Check a loader_run batch's form ({"id", "x"[, "ntok", "padding"]}) and append its
    ids (without padding copies) to ``out["batches"]``."""
    assert batch["x"].shape[1:] == (3,) and batch["x"].shape[0] == batch["id"].shape[0]
    factor = 2.0 if cfg.get("device_transform") else 1.0
    assert torch.equal(batch["x"][:, 0], batch["id"].float() * factor)
    if cfg.get("scalar_leaf") and not cfg.get("even"):
        assert batch["ntok"].dim() == 0 and int(batch["ntok"]) == batch["id"].shape[0]
    if cfg.get("even"):
        out.setdefault("rows", []).append(batch["id"].shape[0])
        out["batches"].append(batch["id"][~batch["padding"]].tolist())
    else:
        out["batches"].append(batch["id"].tolist())
