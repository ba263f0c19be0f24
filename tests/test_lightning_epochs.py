"""Epochs and positions inside the real Lightning (issue 21 rows 7 and 8): ``Trainer.fit`` in
one process (CPU, ``devices=1``) over a `DistributedLoader` returned by ``train_dataloader()``.

Every epoch has a new order and every record once, with no user code (Lightning sets the epoch
on ``dataloader.sampler`` only); a fit resumed from an epoch-end checkpoint runs the next
epoch's order (Lightning calls ``iter()`` before ``set_epoch`` there); a mid-epoch checkpoint
resumes the epoch exactly, and the resumed run is the uninterrupted one, batch for batch.

Data kinds: ``map`` (map-style), ``sized`` (`ShardedDataset` with ``sizes``: it has a len()),
``canonical`` (its canonical layout), ``mixed`` (a `MixedStream` of canonical sources) and
``nolen`` (`ShardedDataset` without sizes: no len(), so Lightning fetches one batch ahead of the
training step; `integrations.lightning.LoaderProgress` tells the loader what it holds).
"""
from __future__ import annotations

import logging
import warnings

import pytest
import torch
from toy_data import Ids

import horovod_iter as hi

L = pytest.importorskip("lightning")
from horovod_iter.integrations.lightning import LoaderProgress  # noqa: E402 - after the skip

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.timeout(300)]

SHARDS = [(s, 5 + s % 3) for s in range(12)]  # 72 records: 18 batches of 4 per epoch
RECORDS = sorted(s * 100 + i for s, n in SHARDS for i in range(n))
EPOCHS = 3
PER_EPOCH = 18


def read_shard(shard, start=0):
    s, size = shard
    return iter(range(s * 100 + start, s * 100 + size))


def make_loader(kind):
    sizes = [n for _, n in SHARDS]
    if kind == "map":
        return hi.DistributedLoader(Ids(72), batch_size=4, seed=1)
    if kind == "sized":
        return hi.DistributedLoader(hi.ShardedDataset(SHARDS, read_shard, sizes=sizes),
                                    batch_size=4)
    if kind == "nolen":
        return hi.DistributedLoader(hi.ShardedDataset(SHARDS, read_shard), batch_size=4)
    if kind == "canonical":
        return hi.DistributedLoader(hi.ShardedDataset(SHARDS, read_shard, sizes=sizes,
                                                      canonical_ranks=1), batch_size=4)
    if kind == "mixed":
        other = [(s + 20, n) for s, n in SHARDS[:6]]
        mix = hi.MixedDataset(
            {"a": hi.ShardedDataset(SHARDS, read_shard, sizes=sizes, canonical_ranks=1),
             "b": hi.ShardedDataset(other, read_shard, sizes=[n for _, n in other], seed=1,
                                    canonical_ranks=1)},
            weights=[0.5, 0.5], samples_per_epoch=72)
        return hi.DistributedLoader(mix, batch_size=4)
    raise AssertionError(kind)


@pytest.fixture(autouse=True)
def external_callbacks(monkeypatch):
    """Lightning's external callbacks (entry points) as a test says: none by default, so a
    test runs alike whether or not horovod_iter's entry point is installed."""
    from lightning.fabric.utilities import registry

    found: dict[str, list] = {}
    monkeypatch.setattr(registry, "entry_points",
                        lambda group=None, **kw: found.get(group, []))
    return found


class Crash(Exception):
    """The run dies here (after a checkpoint)."""


class Recorder(L.LightningModule):
    """Records the ids its training step sees, per epoch; dies at ``crash`` (epoch, batch)."""

    def __init__(self, kind, crash=None, validate=False):
        super().__init__()
        self.kind, self.crash, self.validate = kind, crash, validate
        self.layer = torch.nn.Linear(1, 1)
        self.seen: dict[int, list[int]] = {}

    def training_step(self, batch, batch_idx):
        if (self.current_epoch, batch_idx) == self.crash:
            raise Crash
        self.seen.setdefault(self.current_epoch, []).extend(batch.tolist())
        return self.layer(batch.float().unsqueeze(1)).sum()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return make_loader(self.kind)

    def val_dataloader(self):
        if self.validate:
            return torch.utils.data.DataLoader(Ids(8), batch_size=4)
        return []


def fit(kind, root, *, ckpt_path=None, callbacks=(), crash=None, validate=False):
    """``Trainer.fit`` for EPOCHS epochs: the ids seen per epoch (the run may die at
    ``crash``, after its checkpoints)."""
    model = Recorder(kind, crash, validate)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=EPOCHS, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=str(root),
                        callbacks=list(callbacks),
                        enable_checkpointing=any(isinstance(
                            c, L.pytorch.callbacks.ModelCheckpoint) for c in callbacks),
                        limit_val_batches=1.0 if validate else 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
        if crash is None:
            trainer.fit(model, ckpt_path=ckpt_path)
        else:
            with pytest.raises(Crash):
                trainer.fit(model, ckpt_path=ckpt_path)
    return model.seen


def helper(kind):
    """The callback where Lightning fetches ahead (data without len()); none elsewhere: the
    other kinds need no user code."""
    return [LoaderProgress()] if kind == "nolen" else []


_runs: dict[str, dict[int, list[int]]] = {}


def uninterrupted(kind, tmp_path_factory):
    """The orders of a run with no interruption (one per kind for the module)."""
    if kind not in _runs:
        _runs[kind] = fit(kind, tmp_path_factory.mktemp(f"ref-{kind}"), callbacks=helper(kind))
    return _runs[kind]


def checkpoint_every(folder, **kw):
    return L.pytorch.callbacks.ModelCheckpoint(dirpath=str(folder), save_top_k=-1, **kw)


def assert_epochs(seen, kind):
    """A new order every epoch; every record once per epoch (a mix: the same count)."""
    assert sorted(seen) == list(range(EPOCHS))
    orders = [tuple(seen[e]) for e in range(EPOCHS)]
    assert len(set(orders)) == EPOCHS, "an epoch repeats another's order"
    for e, order in enumerate(orders):
        if kind == "mixed":
            assert len(order) == 72, f"epoch {e}: {len(order)} draws"
        else:
            want = list(range(72)) if kind == "map" else RECORDS
            assert sorted(order) == want, f"epoch {e}: {len(order)} ids, {len(set(order))} " \
                                          "distinct"


# -- (a) row 7: every epoch a new order, in Lightning, with no user code ---------------------
@pytest.mark.parametrize("kind", ["sized", "nolen", "canonical", "mixed"])
def test_row7_lightning_reshuffles_iterable_data_every_epoch(kind, tmp_path):
    assert_epochs(fit(kind, tmp_path), kind)


# -- (b) row 8: resumed from an epoch-end checkpoint, the next epoch's order ------------------
@pytest.mark.parametrize("saved_at", ["train_epoch_end", "validation_end"])
@pytest.mark.parametrize("kind", ["map", "sized", "canonical", "mixed", "nolen"])
def test_row8_lightning_resumed_from_an_epoch_end_runs_the_next_epoch(kind, saved_at, tmp_path,
                                                                     tmp_path_factory):
    """Saved at the end of epoch 0 (ModelCheckpoint on the training epoch's end, or on the
    validation that ends it), resumed with fit(ckpt_path=): epochs 1 and 2 are those of the
    uninterrupted run, so nothing repeats and nothing is left out."""
    ref = uninterrupted(kind, tmp_path_factory)
    validate = saved_at == "validation_end"
    ckpt = checkpoint_every(tmp_path, every_n_epochs=1, filename="{epoch}",
                            save_on_train_epoch_end=not validate)
    first = fit(kind, tmp_path, callbacks=[ckpt, *helper(kind)], crash=(1, 0),
                validate=validate)
    assert first[0] == ref[0]
    resumed = fit(kind, tmp_path, ckpt_path=str(tmp_path / "epoch=0.ckpt"),
                  callbacks=helper(kind), validate=validate)
    assert sorted(resumed) == [1, 2]
    assert resumed[1] != ref[0], "the resumed epoch replays epoch 0's order"
    assert resumed[1] == ref[1] and resumed[2] == ref[2]
    assert_epochs({0: first[0], **resumed}, kind)


# -- (c) a mid-epoch checkpoint resumes the epoch exactly once ---------------------------------
@pytest.mark.parametrize("kind", ["map", "sized", "canonical", "mixed", "nolen"])
def test_lightning_mid_epoch_checkpoint_resumes_exactly_once(kind, tmp_path, tmp_path_factory):
    """A checkpoint every 7 steps; the run dies in epoch 1 after the one at step 28 (epoch 1,
    batch 9); resumed from it, epoch 1 goes on at batch 10 and the run is the uninterrupted
    one: each record once per epoch, each epoch a new order."""
    ref = uninterrupted(kind, tmp_path_factory)
    ckpt = checkpoint_every(tmp_path, every_n_train_steps=7, filename="{step}")
    first = fit(kind, tmp_path, callbacks=[ckpt, *helper(kind)], crash=(1, 12))
    resumed = fit(kind, tmp_path, ckpt_path=str(tmp_path / "step=28.ckpt"),
                  callbacks=helper(kind))
    before = first[1][:10 * 4]  # epoch 1's batches 0-9, trained before the checkpoint
    assert before + resumed[1] == ref[1]
    assert resumed[2] == ref[2]
    assert_epochs({0: first[0], 1: before + resumed[1], 2: resumed[2]}, kind)


# -- the callback alone, without the loader's look at Lightning's frames ----------------------
@pytest.fixture
def no_frame_reading(monkeypatch):
    """The loader no longer finds Lightning's fetcher in its callers' frames (what it does
    until the switch to LoaderProgress): only the callback tells it what Lightning holds."""
    import horovod_iter.loader as loader_module

    monkeypatch.setattr(loader_module, "fetching_ahead", lambda: None, raising=False)


def test_mid_epoch_checkpoint_of_data_without_len_is_exact_through_the_callback(
        tmp_path, tmp_path_factory, no_frame_reading):
    ref = uninterrupted("nolen", tmp_path_factory)
    ckpt = checkpoint_every(tmp_path, every_n_train_steps=7, filename="{step}")
    first = fit("nolen", tmp_path, callbacks=[ckpt, LoaderProgress()], crash=(1, 12))
    state = torch.load(tmp_path / "step=28.ckpt", weights_only=False)
    [saved] = state["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert (saved["epoch"], saved["steps"]) == (1, 10)  # not the batch Lightning held
    resumed = fit("nolen", tmp_path, ckpt_path=str(tmp_path / "step=28.ckpt"),
                  callbacks=[LoaderProgress()])
    assert first[1][:40] + resumed[1] == ref[1]


def test_without_the_callback_or_frames_the_held_batch_would_be_skipped(tmp_path,
                                                                      no_frame_reading):
    """What the callback prevents: the state counts the batch Lightning fetched ahead."""
    ckpt = checkpoint_every(tmp_path, every_n_train_steps=7, filename="{step}")
    fit("nolen", tmp_path, callbacks=[ckpt], crash=(1, 12))
    state = torch.load(tmp_path / "step=28.ckpt", weights_only=False)
    [saved] = state["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert (saved["epoch"], saved["steps"]) == (1, 11)


# -- two ranks: the restart of Lightning's fetch happens on every rank alike -----------------
@pytest.mark.distributed
@pytest.mark.slow  # the Lightning family's default launch is in test_frameworks
@pytest.mark.timeout(400)
def test_ddp_resumed_from_an_epoch_end_runs_the_next_epoch_on_every_rank(tmp_path):
    """torchrun, Lightning DDP on 2 CPU ranks, a ShardedDataset without sizes: uninterrupted
    3 epochs; 1 epoch with an epoch-end checkpoint; 3 epochs resumed from it. The resumed
    epochs are the uninterrupted ones on each rank: every record once per epoch over the
    ranks, each epoch a new order."""
    from harness import launch

    res = launch("torch", 2, "lightning_run.py", "epoch_end_resume", str(tmp_path),
                 timeout=360)
    assert [r["rank"] for r in res] == [0, 1]
    for r in res:
        assert r["first"]["0"] == r["full"]["0"]
        assert sorted(r["resumed"]) == ["1", "2"]
        assert r["resumed"]["1"] != r["full"]["0"], "the resumed epoch replays epoch 0's order"
        assert r["resumed"]["1"] == r["full"]["1"] and r["resumed"]["2"] == r["full"]["2"]
    for e in ("0", "1", "2"):
        ids = sorted(res[0]["full"][e] + res[1]["full"][e])
        assert ids == RECORDS, f"epoch {e}: {len(ids)} ids, {len(set(ids))} distinct"



def test_every_trainer_gets_the_callback_through_lightnings_entry_point(
        tmp_path, tmp_path_factory, external_callbacks):
    """No callback in the user's code: horovod_iter's entry point (what setup.cfg registers)
    gives every Trainer one, so data without len() resumed from an epoch end runs the next
    epoch's order."""
    from importlib.metadata import EntryPoint

    ref = uninterrupted("nolen", tmp_path_factory)
    external_callbacks["lightning.pytorch.callbacks_factory"] = [EntryPoint(
        name="horovod_iter", value="horovod_iter.integrations.lightning:callbacks",
        group="lightning.pytorch.callbacks_factory")]
    ckpt = checkpoint_every(tmp_path, every_n_epochs=1, filename="{epoch}",
                            save_on_train_epoch_end=True)
    fit("nolen", tmp_path, callbacks=[ckpt], crash=(1, 0))
    resumed = fit("nolen", tmp_path, ckpt_path=str(tmp_path / "epoch=0.ckpt"))
    assert resumed[1] == ref[1] and resumed[2] == ref[2]


def test_the_older_package_name_gets_its_own_callback_class():
    pl = pytest.importorskip("pytorch_lightning")
    from horovod_iter.integrations.lightning import pytorch_lightning_callbacks

    [cb] = pytorch_lightning_callbacks()
    assert isinstance(cb, pl.Callback) and type(cb).__name__ == "LoaderProgress"


# -- loader.sampler.set_epoch during a pass of iterable data: the next pass's epoch ------------
def read_range(shard, start=0):
    return iter(range(shard * 10 + start, shard * 10 + 8))


def test_sampler_set_epoch_during_a_pass_of_iterable_data_keeps_its_position():
    """Lightning without the callback, data without len(), resumed from an epoch end: it
    fetches a batch of the old epoch, then sets the new one on loader.sampler, and trains
    that pass. A checkpoint in it must resume it (map-style data does: its sampler's epoch
    applies at the next pass); it resumed the new epoch from its start (24 of 72 twice)."""
    def make():
        return hi.DistributedLoader(hi.ShardedDataset(list(range(9)), read_range), batch_size=4)

    loader = make()
    it = iter(loader)
    taken = next(it).tolist()       # Lightning's fetch ahead, at iter()
    loader.sampler.set_epoch(1)     # then its set_epoch
    for _ in range(5):
        taken += next(it).tolist()
    resumed = make()
    resumed.load_state_dict(loader.state_dict())
    rest = [x for b in resumed for x in b.tolist()]
    assert sorted(taken + rest) == sorted(s * 10 + i for s in range(9) for i in range(8))
