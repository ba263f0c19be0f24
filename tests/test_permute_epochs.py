"""`permute_epochs` (one pass over many epochs) is `permute` per epoch, and
`MixedDataset.locate` through it gives the same indices as the per-epoch loop it replaced."""
from __future__ import annotations

import numpy as np

import horovod_iter as hi
from horovod_iter.permutation import permute, permute_epochs


def test_permute_epochs_is_permute_per_element() -> None:
    rng = np.random.default_rng(1)
    for trial in range(120):
        n = int(rng.integers(0, 3000)) if trial % 3 else int(rng.integers(0, 5))
        pos = rng.integers(0, max(n, 1), int(rng.integers(0, 300))) if n else np.zeros(0, int)
        ep = rng.integers(0, int(rng.integers(1, 400)), pos.size)
        seed = int(rng.integers(0, 2**40))
        want = np.array([permute(int(p), n, seed, int(e))[0] for p, e in zip(pos, ep)],
                        dtype=np.int64)
        got = permute_epochs(pos, n, seed, ep)
        assert got.dtype == np.int64
        assert np.array_equal(got, want), (n, seed)


def _reference_locate(m: hi.MixedDataset, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The per-source-epoch loop `locate` had before it was vectorised."""
    src = m.source_of(idx)
    inner = np.empty_like(idx)
    for j in np.unique(src).tolist():
        sel = src == j
        n = m.lengths[j]
        draws = m.epoch * m.counts[j] + (idx[sel] - m._starts[j])
        pos, src_epoch = draws % n, draws // n
        if not m.shuffle:
            inner[sel] = pos
            continue
        out = np.empty_like(pos)
        for f in np.unique(src_epoch).tolist():
            at = src_epoch == f
            out[at] = permute(pos[at], n, m.seed + j, int(f))
        inner[sel] = out
    return src, inner


def test_locate_matches_the_per_epoch_loop() -> None:
    rng = np.random.default_rng(0)
    for trial in range(40):
        lengths = [int(x) for x in rng.integers(1, 5000, int(rng.integers(1, 5)))]
        m = hi.MixedDataset([list(range(n)) for n in lengths], list(rng.random(len(lengths)) + .01),
                            samples_per_epoch=int(rng.integers(1, 200_000)),
                            seed=int(rng.integers(0, 1000)), shuffle=bool(trial % 4))
        m.set_epoch(int(rng.integers(0, 50)))
        idx = rng.integers(0, len(m), int(rng.integers(1, 2048)))
        src, inner = m.locate(idx)
        want_src, want_inner = _reference_locate(m, idx)
        assert np.array_equal(src, want_src) and np.array_equal(inner, want_inner)


def test_tabled_round_functions_give_the_same_permutation(monkeypatch) -> None:
    """Round functions read from tables (halves <= 16 bits, many positions at once: the fast
    path a fetch thread takes) are the computed ones: every order, every size, small and large
    asks, with and without the tables made."""
    import horovod_iter.permutation as perm

    rng = np.random.default_rng(7)
    sizes = [2, 3, 5, 100, 4097, 65537, 1_200_000, (1 << 32) - 1, 1 << 32, (1 << 32) + 5]
    for n in sizes:
        seed, epoch = int(rng.integers(0, 2**40)), int(rng.integers(0, 1000))
        pos = rng.integers(0, n, min(n, 40_000))
        perm._TABLES.clear()
        fast, one = permute(pos, n, seed, epoch), permute(pos[:1], n, seed, epoch)
        with monkeypatch.context() as m:
            m.setattr(perm, "_TABLE_BITS", 0)  # every round computed
            slow = permute(pos, n, seed, epoch)
        assert np.array_equal(fast, slow) and one[0] == slow[0], n
    # a lone position of a big epoch builds no table (it costs microseconds, not a table)
    perm._TABLES.clear()
    permute(5, 1 << 31, 1, 2)
    assert not perm._TABLES
