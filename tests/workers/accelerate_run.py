"""HF Accelerate under torchrun, 2 ranks on CPU: accelerator.prepare() passes a
hi.DistributedLoader through untouched; registered for checkpointing, save_state/load_state
resume it exactly. ``eval`` (uneven="pad", gathered with hi.gather_rows) and ``eval_even``
(even_batches=True, gathered with accelerator.gather_for_metrics). argv[1]: ``save`` (6 steps
of epoch 0, then save_state) or ``resume`` (load_state, then the rest of epochs 0 and 1);
argv[2]: the state folder. ``refusals``: accelerate sharding our data again, each refused with
ShardingError on every rank (what each trained otherwise is reported): a DataLoader with our
sampler (BatchSamplerShard; and dispatch_batches=True: 50 of 100 before), and one over a
hi.ShardedDataset (dispatched by default: 26 + 28 of 58 before; IterableDatasetShard with
dispatch_batches=False). ``horovod_world`` (under horovodrun): an Accelerator of one process
beside our 2 ranks warns at the loader's construction."""
import os
import sys
import time

import accelerate
import torch
from harness import report
from torch.utils.data import DataLoader, Dataset

import horovod_iter as hi

case, folder = sys.argv[1], sys.argv[2]
N = 64


class Ids(Dataset):
    def __len__(self):
        return 17 if case.startswith("eval") else N

    def __getitem__(self, i):
        return {"id": torch.tensor(i), "x": torch.full((4,), float(i))}


acc = accelerate.Accelerator(cpu=True)
out = {"rank": acc.process_index, "world": acc.num_processes, "seen": {}, "error": None}
RANK = int(os.environ.get("RANK", os.environ.get("HOROVOD_RANK", "0")))


def refused(make, dispatch):
    """What iterating ``make()`` prepared by an Accelerator with ``dispatch_batches`` gives:
    the error, or the ids this rank trained on."""
    config = accelerate.utils.DataLoaderConfiguration(dispatch_batches=dispatch)
    a = accelerate.Accelerator(cpu=True, dataloader_config=config)
    try:
        return {"ids": [int(i) for b in a.prepare(make()) for i in b["id"]]}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


def write_shards(folder):
    import json

    os.makedirs(folder, exist_ok=True)
    paths, start = [], 0
    for k, size in enumerate([17, 9, 13, 19]):  # 58 samples
        path = os.path.join(folder, f"s{k}.jsonl")
        if RANK == 0:
            with open(path + ".tmp", "w") as f:
                f.writelines(json.dumps({"id": i}) + "\n" for i in range(start, start + size))
            os.replace(path + ".tmp", path)
        paths.append(path)
        start += size
    while not all(os.path.exists(p) for p in paths):
        time.sleep(0.05)
    return paths


def read_ids(path):
    import json

    with open(path) as f:
        return [{"id": torch.tensor(json.loads(line)["id"])} for line in f]

torch.manual_seed(0)  # the same model on every rank
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
try:
    if case == "eval":
        loader = acc.prepare(hi.DistributedLoader(Ids(), batch_size=4, shuffle=False,
                                                  uneven="pad", timeout=60))
        ids, preds, rows = [], [], []
        with torch.no_grad():
            for batch in loader:
                rows.append(len(batch["id"]))
                ids.append(batch["id"])
                preds.append(model(batch["x"]).squeeze(1))
        out["rows"] = rows
        all_ids, all_preds = hi.gather_rows((torch.cat(ids), torch.cat(preds)))
        out["gathered"] = all_ids.tolist()
        out["preds_match"] = torch.allclose(
            all_preds, model(torch.stack([Ids()[i]["x"] for i in all_ids.tolist()])).squeeze(1))
    elif case == "eval_even":  # accelerate's own gather: equal shapes, the copies flagged
        loader = acc.prepare(hi.DistributedLoader(
            Ids(), batch_size=4, shuffle=False, uneven="pad", timeout=60, even_batches=True,
            mark_padding=hi.flag_padding()))
        gathered, rows = [], []
        with torch.no_grad():
            for batch in loader:
                rows.append(len(batch["id"]))
                ids, preds, pad = acc.gather_for_metrics(
                    (batch["id"], model(batch["x"]).squeeze(1), batch["padding"]))
                gathered.append((ids[~pad], preds[~pad]))
        out["rows"] = rows
        all_ids = torch.cat([i for i, _ in gathered])
        all_preds = torch.cat([p for _, p in gathered])
        out["gathered"] = all_ids.tolist()
        out["preds_match"] = torch.allclose(
            all_preds, model(torch.stack([Ids()[i]["x"] for i in all_ids.tolist()])).squeeze(1))
    elif case == "refusals":
        shards = write_shards(folder)
        out["cases"] = {
            "sampler": refused(lambda: DataLoader(Ids(), batch_size=4,
                                                  sampler=hi.DistributedSampler(Ids())), None),
            "sampler_dispatched": refused(lambda: DataLoader(
                Ids(), batch_size=4, sampler=hi.DistributedSampler(Ids())), True),
            "sharded": refused(lambda: DataLoader(hi.ShardedDataset(shards, read_ids),
                                                  batch_size=4), None),
            "sharded_not_dispatched": refused(lambda: DataLoader(
                hi.ShardedDataset(shards, read_ids), batch_size=4), False),
        }
    elif case == "horovod_world":
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hi.DistributedLoader(Ids(), batch_size=2)
        out["warnings"] = [str(w.message) for w in caught]
    else:
        loader = hi.DistributedLoader(Ids(), batch_size=4, timeout=60)
        model, opt, prepared = acc.prepare(model, opt, loader)
        out["passed_through"] = prepared is loader
        acc.register_for_checkpointing(loader)
        if case == "resume":
            acc.load_state(folder)
        for epoch in range(loader.epoch, 2):
            loader.set_epoch(epoch)
            for step, batch in enumerate(loader):
                out["seen"].setdefault(str(epoch), []).extend(batch["id"].tolist())
                loss = model(batch["x"]).sum()
                acc.backward(loss)
                opt.step()
                opt.zero_grad()
                if case == "save" and step == 5:
                    acc.save_state(folder)
                    break
            if case == "save":
                break
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
report(out, rank=RANK)
sys.stdout.flush()
os._exit(0)
