"""PyTorch Lightning, Trainer(strategy="ddp", devices=2) on CPU with its own launcher; argv[1]:

* ``sampler``: DataLoader(ds, sampler=hi.DistributedSampler(ds)) from train_dataloader()
  (Lightning's default use_distributed_sampler=True);
* ``loader``: hi.DistributedLoader from train_dataloader() and, uneven="pad", from
  val_dataloader();
* ``prebuilt``: the loader built before trainer.fit(), passed as fit(train_dataloaders=...);
* ``save``/``resume``: a mid-epoch checkpoint (ModelCheckpoint every 7 steps, then the run
  stops at step 9) and a run resumed from it with fit(ckpt_path=...): argv[2] is the folder;
* ``sharded_save``/``sharded_resume``: the same over a ShardedDataset without sizes (no
  len(): Lightning fetches one batch ahead of the training step), shards in argv[2]/shards.

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


callbacks = []
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
    ckpt = sorted(folder.glob("*.ckpt"))[-1]
    trainer.fit(model, ckpt_path=str(ckpt))
else:
    trainer.fit(model)
sys.stdout.flush()
os._exit(0)
