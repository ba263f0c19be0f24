"""ShardedDataset's cross-shard shuffle (``interleave``): records of many shards in every batch,
as a uniform shuffle has them, each still exactly once, and resumed exactly (the same stream on
the same layout; exactly once on another). In process: the layout is a pure function."""
from __future__ import annotations

import random

import numpy as np
import pytest

import horovod_iter as hi


def dataset(counts, rank=0, ranks=1, **kw):
    starts = np.cumsum([0, *counts[:-1]]).tolist()

    def read(s, start=0):
        return iter(range(starts[s] + start, starts[s] + counts[s]))

    return hi.ShardedDataset(list(range(len(counts))), read, rank=rank, num_replicas=ranks,
                             **kw)


COUNTS = [random.Random(7).randint(50, 150) for _ in range(64)]


def shards_per_batch(per_rank, batch):
    owner = np.repeat(np.arange(len(COUNTS)), COUNTS)
    steps = min(len(s) for s in per_rank) // batch
    return np.mean([len({int(owner[i]) for s in per_rank for i in s[k * batch:(k + 1) * batch]})
                    for k in range(steps)])


@pytest.mark.parametrize("with_sizes", [False, True])
def test_batches_mix_as_many_shards_as_a_uniform_shuffle(with_sizes):
    """64 shards over 2 ranks, batches of 16 per rank: at least 0.9 of the uniform shuffle's
    distinct shards per global batch (it was ~1 shard after another), consecutive ids
    uncorrelated, every record once."""
    kw = dict(sizes=COUNTS) if with_sizes else {}
    per_rank = [list(dataset(COUNTS, r, 2, seed=1, **kw)) for r in range(2)]
    assert sorted(i for s in per_rank for i in s) == list(range(sum(COUNTS)))
    perm = np.random.default_rng(1).permutation(sum(COUNTS)).tolist()
    uniform = shards_per_batch([perm[0::2], perm[1::2]], 16)
    ours = shards_per_batch(per_rank, 16)
    sequential = shards_per_batch([list(dataset(COUNTS, r, 2, seed=1, interleave=1, **kw))
                                   for r in range(2)], 16)
    assert ours >= 0.9 * uniform > 3 * sequential, (ours, uniform, sequential)
    ids = np.asarray(per_rank[0], dtype=float)
    assert abs(np.corrcoef(ids[:-1], ids[1:])[0, 1]) < 0.1


@pytest.mark.parametrize("with_sizes", [False, True])
@pytest.mark.parametrize("cut", [1, 137, 1000, -1])
def test_a_resume_on_the_same_layout_continues_the_same_stream(cut, with_sizes):
    kw = dict(sizes=COUNTS[:24]) if with_sizes else {}
    full = list(dataset(COUNTS[:24], seed=3, interleave=8, **kw))
    first = dataset(COUNTS[:24], seed=3, interleave=8, **kw)
    it = iter(first)
    head = [next(it) for _ in range(cut if cut > 0 else len(full) - 1)]
    state = first.merge_states([first.state_dict()], 1)
    again = dataset(COUNTS[:24], seed=3, interleave=8, **kw)
    again.load_state_dict(state)
    assert head + list(again) == full


@pytest.mark.parametrize("before, after", [(1, 3), (3, 2), (2, 5)])
def test_a_resume_on_another_layout_reads_every_record_once(before, after):
    counts = COUNTS[:20]
    firsts = [dataset(counts, r, before, seed=5, interleave=4) for r in range(before)]
    head, states = [], []
    for r, ds in enumerate(firsts):
        it = iter(ds)
        head += [next(it) for _ in range(150 + 40 * r)]
        states.append(ds.state_dict())
    merged = firsts[0].merge_states(states, before)
    rest = []
    for r in range(after):
        ds = dataset(counts, r, after, seed=5, interleave=4)
        ds.load_state_dict(merged)
        rest += list(ds)
    assert sorted(head + rest) == list(range(sum(counts)))


def test_interleave_is_checked_and_off_without_shuffle():
    with pytest.raises(ValueError, match="interleave must be an int >= 1"):
        dataset([3], interleave=0)
    assert list(dataset([3, 4], shuffle=False)) == list(range(7))  # in shard order
