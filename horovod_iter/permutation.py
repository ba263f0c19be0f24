"""The epoch's index order as a pure function of (seed, epoch, n), in O(1) memory.

The order is a keyed pseudorandom permutation of ``[0, n)``: an 8-round unbalanced Feistel
network over the smallest power-of-two domain ``2**b >= n`` (``b >= 2``), made a permutation of
``[0, n)`` by cycle walking (re-encrypting any value that falls outside ``[0, n)``; expected
< 2 rounds trips since ``2**b < 2n``). Any single position is computed on demand, so the first
index of an epoch costs microseconds and memory does not grow with ``n`` - unlike torch's
``DistributedSampler``, which materialises ``randperm(n)`` on every rank.

Keys: the eight 32-bit round keys come from BLAKE2b of ``(seed, epoch)``, so distinct
(seed, epoch) pairs give independent orders (no ``seed + epoch`` aliasing, the flaw of
Horovod's ElasticSampler). Round function: the murmur3 64-bit finaliser of (half-block xor key),
a strong avalanche mixer; by Luby-Rackoff, >= 4 rounds of a good round function give a
pseudorandom permutation, and we use 8.

Everything here is vectorised numpy on 64-bit integer arrays; no state, no I/O. Where a round's
input half has at most 16 bits (``n <= 2**32``) and enough positions are asked at once, each
round function is read from a table of its values (made once per seed, epoch and size, <= 4 MB)
and the two halves are kept apart: the same permutation with a third of the numpy calls and none
of the 64-bit multiplies, which matters on a fetch thread, where each call hands the GIL back and
forth with the trainer.
"""
from __future__ import annotations

import hashlib
import threading
from functools import lru_cache

import numpy as np

__all__ = ["ROUNDS", "permutation", "permute", "permute_epochs"]

ROUNDS = 8
_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)


@lru_cache(maxsize=256)
def _round_keys(seed: int, epoch: int) -> tuple[np.uint64, ...]:
    digest = hashlib.blake2b(f"horovod_iter:{seed}:{epoch}".encode(), digest_size=8 * ROUNDS,
                             person=b"hi.perm.v1").digest()
    return tuple(np.uint64(int.from_bytes(digest[8 * i: 8 * i + 8], "little"))
                 for i in range(ROUNDS))


def _mix(x: np.ndarray, key: np.uint64 | np.ndarray) -> np.ndarray:
    """murmur3's fmix64 of x ^ key (wrapping uint64 arithmetic)."""
    v = x ^ key
    v ^= v >> _S33
    v *= _M1
    v ^= v >> _S33
    v *= _M2
    v ^= v >> _S33
    return v


#: round functions whose input half has at most this many bits are tabulated
_TABLE_BITS = 16
#: the round tables made last, by (seed, epoch, bits): a pass reads one epoch's over and over
_TABLES: dict[tuple[int, int, int], tuple[np.ndarray, ...]] = {}
_TABLES_KEPT = 8
_TABLES_LOCK = threading.Lock()  # a fetch thread and the trainer's thread may both permute


def _round_tables(seed: int, epoch: int, bits: int) -> tuple[np.ndarray, ...]:
    """Each round's function over its whole input range: ``tables[r][lo] == F_r(lo)`` (the
    values `_feistel` computes with `_mix`), as int64 (what `np.take` gives without a cast)."""
    a = bits // 2
    c = bits - a
    tables = []
    for key in _round_keys(seed, epoch):
        lo = np.arange(1 << c, dtype=np.uint64)
        tables.append((_mix(lo, key) & np.uint64((1 << a) - 1)).astype(np.int64))
        a, c = c, a
    return tuple(tables)


def _tables_for(size: int, seed: int, epoch: int, bits: int) -> tuple[np.ndarray, ...] | None:
    """The round tables where they pay: halves of at most `_TABLE_BITS` bits, and the tables
    made already or ``size`` positions at least an eighth of a table (a lone position of a
    big epoch keeps costing microseconds)."""
    c = bits - bits // 2
    if c > _TABLE_BITS:
        return None
    key = (seed, epoch, bits)
    tables = _TABLES.get(key)
    if tables is None:
        if size * 8 < (1 << c):
            return None
        tables = _round_tables(seed, epoch, bits)
        with _TABLES_LOCK:
            _TABLES[key] = tables
            while len(_TABLES) > _TABLES_KEPT:  # the oldest first
                del _TABLES[next(iter(_TABLES))]
    return tables


def _feistel_tabled(x: np.ndarray, bits: int, tables: tuple[np.ndarray, ...]) -> np.ndarray:
    """`_feistel` of int64 ``x`` with each round function read from its table, on the two
    halves kept apart: a round is one look-up and one xor in place (``hi ^= F(lo)``, then the
    halves trade roles), two numpy calls where the joined block takes six. ``bits <= 32``:
    nothing reaches the sign bit. ``mode="wrap"``: the halves are in range by construction,
    and unlike ``"raise"`` it writes to ``out`` without a copy."""
    c = bits - bits // 2
    hi = x >> c
    lo = x & ((1 << c) - 1)
    f = np.empty_like(hi)
    for r in range(0, ROUNDS, 2):  # an even count: the halves end where they started
        np.take(tables[r], lo, out=f, mode="wrap")
        hi ^= f
        np.take(tables[r + 1], hi, out=f, mode="wrap")
        lo ^= f
    hi <<= c
    hi |= lo
    return hi


def _feistel(x: np.ndarray, bits: int, keys: tuple[np.uint64, ...]) -> np.ndarray:
    """A bijection of [0, 2**bits), applied elementwise."""
    a = bits // 2  # alternating half widths a, c = bits - a
    c = bits - a
    for key in keys:
        hi = x >> np.uint64(c)
        lo = x & np.uint64((1 << c) - 1)
        f = _mix(lo, key) & np.uint64((1 << a) - 1)
        # new block: lo on top (c bits), hi ^ F(lo) below (a bits); then the widths swap.
        x = (lo << np.uint64(a)) | (hi ^ f)
        a, c = c, a
    return x


def permute(positions: np.ndarray | int, n: int, seed: int, epoch: int) -> np.ndarray:
    """Map positions in ``[0, n)`` to their indices in the (seed, epoch) order of ``[0, n)``.

    ``permute(np.arange(n), n, seed, epoch)`` is a permutation of ``range(n)``; any slice of
    positions costs only its own length. Returns an int64 array.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    x = np.atleast_1d(np.asarray(positions, dtype=np.int64))
    if x.size and (x.min() < 0 or x.max() >= n):
        raise ValueError(f"positions must lie in [0, {n}), got values in [{x.min()}, {x.max()}]")
    if n <= 1 or x.size == 0:
        return x.copy()
    bits = max(2, int(n - 1).bit_length())
    keys = _round_keys(int(seed), int(epoch))
    tables = _tables_for(x.size, int(seed), int(epoch), bits)

    def encrypt(v: np.ndarray) -> np.ndarray:  # int64 throughout: n <= 2**63, so bits <= 63
        if tables is None:
            return _feistel(v.astype(np.uint64), bits, keys).astype(np.int64)
        return _feistel_tabled(v, bits, tables)

    y = encrypt(x)
    walking = np.flatnonzero(y >= n)
    while walking.size:  # cycle walking: stays a bijection of [0, n)
        z = encrypt(y[walking])
        y[walking] = z
        walking = walking[z >= n]
    return y


def permute_epochs(positions: np.ndarray, n: int, seed: int, epochs: np.ndarray) -> np.ndarray:
    """`permute` of each position in its own epoch's order: ``out[i] == permute(positions[i],
    n, seed, epochs[i])``, in one vectorised pass however many distinct epochs there are (a
    small source of a mix spans hundreds of its epochs in one batch)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    x = np.asarray(positions, dtype=np.int64).reshape(-1)
    ep = np.asarray(epochs, dtype=np.int64).reshape(-1)
    if ep.shape != x.shape:
        raise ValueError(f"positions and epochs must have the same length, got {x.size} "
                         f"and {ep.size}")
    if x.size and (x.min() < 0 or x.max() >= n):
        raise ValueError(f"positions must lie in [0, {n}), got values in [{x.min()}, {x.max()}]")
    if n <= 1 or x.size == 0:
        return x.copy()
    bits = max(2, int(n - 1).bit_length())
    distinct, which = np.unique(ep, return_inverse=True)
    table = np.array([_round_keys(int(seed), int(e)) for e in distinct.tolist()],
                     dtype=np.uint64)  # (distinct epochs, ROUNDS)
    keys = table[which.reshape(-1)]  # each position's round keys
    y = _feistel_keyed(x.astype(np.uint64), bits, keys)
    un = np.uint64(n)
    out = y >= un
    while out.any():  # cycle walking, as in `permute`
        idx = np.nonzero(out)[0]
        z = _feistel_keyed(y[idx], bits, keys[idx])
        y[idx] = z
        out[idx] = z >= un
    return y.astype(np.int64)


def _feistel_keyed(x: np.ndarray, bits: int, keys: np.ndarray) -> np.ndarray:
    """`_feistel` with each element's own round keys (``keys``: one row per element)."""
    a = bits // 2
    c = bits - a
    for r in range(ROUNDS):
        hi = x >> np.uint64(c)
        lo = x & np.uint64((1 << c) - 1)
        f = _mix(lo, keys[:, r]) & np.uint64((1 << a) - 1)
        x = (lo << np.uint64(a)) | (hi ^ f)
        a, c = c, a
    return x


def permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The whole (seed, epoch) order of ``[0, n)`` (materialised; for tests and small n)."""
    return permute(np.arange(n, dtype=np.int64), n, seed, epoch)
