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
