"""PyTorch Lightning, Trainer(strategy="ddp", devices=2) on CPU with its own launcher; argv[1]:

* ``sampler``: DataLoader(ds, sampler=hi.DistributedSampler(ds)) from train_dataloader()
  (Lightning's default use_distributed_sampler=True);
* ``loader``: hi.DistributedLoader from train_dataloader() and, uneven="pad", from
  val_dataloader();
* ``prebuilt``: the loader built before trainer.fit(), passed as fit(train_dataloaders=...);
* ``save``/``resume``: a mid-epoch checkpoint (ModelCheckpoint every 7 steps, then the run
  stops at step 9) and a run resumed from it with fit(ckpt_path=...): argv[2] is the folder;
* ``sharded_save``/``sharded_resume``: the same over a ShardedDataset without sizes (no
  len(): Lightning fetches one batch ahead of the training step; `LoaderProgress` tells the
  loader what it holds), shards in argv[2]/shards.
* ``epoch_end_resume`` (under torchrun, three fits in one job): 3 epochs uninterrupted; 1
  epoch that saves an epoch-end checkpoint; 3 epochs resumed from it with fit(ckpt_path=), all
  over a ShardedDataset without sizes with `LoaderProgress`. argv[2] is the folder.

Each rank reports the sample ids its training_step saw per epoch, and the validation ids.
"""
import os
import sys
from pathlib import Path

import lightning as L
import torch
from harness import report
from torch.utils.data import DataLoader
from toy_data import Mapped

import horovod_iter as hi
from horovod_iter.integrations.lightning import LoaderProgress

case = sys.argv[1]
folder = Path(sys.argv[2]) if len(sys.argv) > 2 else None
N, VAL = 96, 22


def Ids(n):  # a dataset of these samples
    return Mapped(n, lambda i: {"id": torch.tensor(i), "x": torch.full((4,), float(i))})


def read_jsonl(path):
    import json

    with open(path) as f:
        for line in f:
            yield json.loads(line)["id"]


def collate_ids(ids):
    t = torch.tensor(ids)
    return {"id": t, "x": t.float().unsqueeze(1).repeat(1, 4)}


class Model(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.seen = {}
        self.val = []

    def training_step(self, batch, i):
        self.seen.setdefault(str(self.current_epoch), []).extend(batch["id"].tolist())
        if case.endswith("save") and self.global_step == 9:
            self.trainer.should_stop = True
            self.trainer.limit_train_batches = 0
        return self.layer(batch["x"]).sum()

    def validation_step(self, batch, i):
        self.val.extend(batch["id"].tolist())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        if case == "sampler":
            return DataLoader(Ids(N), batch_size=4, sampler=hi.DistributedSampler(Ids(N)))
        if case in ("loader", "save", "resume"):
            return hi.DistributedLoader(Ids(N), batch_size=4, timeout=60)
        if case.startswith("sharded"):
            shards = sorted(str(p) for p in (folder / "shards").glob("*.jsonl"))
            data = hi.ShardedDataset(shards, read_jsonl, seed=2)
            return hi.DistributedLoader(data, batch_size=4, uneven="pad", timeout=60,
                                        collate_fn=collate_ids)
        return None

    def val_dataloader(self):
        if case == "loader":
            return hi.DistributedLoader(Ids(VAL), batch_size=4, uneven="pad", shuffle=False,
                                        timeout=60)
        return []

    def on_train_end(self):
        self.report()

    def report(self):
        report({"rank": self.global_rank, "world": self.trainer.world_size, "seen": self.seen,
                "val": self.val, "backend": hi.init().name}, rank=self.global_rank)


if case == "epoch_end_resume":
    SHARDS = [(s, 5 + s % 3) for s in range(12)]  # 72 records, 9 batches of 4 per rank

    def read_shard(shard, start=0):
        s, size = shard
        return iter(range(s * 100 + start, s * 100 + size))

    class Stream(Model):
        def training_step(self, batch, i):
            self.seen.setdefault(str(self.current_epoch), []).extend(batch.tolist())
            return self.layer(batch.float().unsqueeze(1).repeat(1, 4)).sum()

        def train_dataloader(self):
            return hi.DistributedLoader(hi.ShardedDataset(SHARDS, read_shard), batch_size=4,
                                        uneven="pad", timeout=60)

        def on_train_end(self):
            pass  # the job reports once, after its three fits

    def stream_fit(epochs, ckpt=None, save=False):
        callbacks = [LoaderProgress()]
        if save:
            callbacks.append(L.pytorch.callbacks.ModelCheckpoint(
                dirpath=folder, every_n_epochs=1, save_top_k=-1, filename="epoch{epoch}",
                save_on_train_epoch_end=True))
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=epochs,
                            logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=save,
                            callbacks=callbacks, num_sanity_val_steps=0,
                            default_root_dir=folder)
        model = Stream()
        trainer.fit(model, ckpt_path=ckpt)
        return model.seen

    runs = {"full": stream_fit(3), "first": stream_fit(1, save=True)}
    torch.distributed.barrier()
    runs["resumed"] = stream_fit(3, ckpt=str(folder / "epochepoch=0.ckpt"))
    report({"rank": int(os.environ["RANK"]), **runs}, rank=int(os.environ["RANK"]))
    sys.stdout.flush()
    os._exit(0)

callbacks = [LoaderProgress()] if case.startswith("sharded") else []
if case.endswith("save"):
    callbacks.append(L.pytorch.callbacks.ModelCheckpoint(
        dirpath=folder, every_n_train_steps=7, save_top_k=-1, filename="step{step}"))
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2,
                    logger=False, enable_progress_bar=False, enable_model_summary=False,
                    enable_checkpointing=case.endswith("save"), callbacks=callbacks,
                    num_sanity_val_steps=0, use_distributed_sampler=True)
model = Model()
if case == "prebuilt":
    loader = hi.DistributedLoader(Ids(N), batch_size=4, timeout=60)  # before the launcher
    trainer.fit(model, train_dataloaders=loader)
elif case.endswith("resume"):
    ckpt = max(folder.glob("*.ckpt"))
    trainer.fit(model, ckpt_path=str(ckpt))
else:
    trainer.fit(model)
sys.stdout.flush()
os._exit(0)
