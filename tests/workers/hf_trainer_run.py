"""HF transformers.Trainer under torchrun, 2 ranks on CPU, a tiny BERT built from a config (no
download); the training data is a hi.DistributedLoader returned by get_train_dataloader().
argv[1]: ``train`` (2 epochs, then evaluate with HF's own evaluation data loader) or
``save``/``resume`` (save_steps=5, stop at step 11, in epoch 1; then resume_from_checkpoint
from step 10), or ``eval_pad`` (evaluate() only, over a hi.DistributedLoader with
uneven="pad", even_batches=True, mark_padding=hi.mask_labels()), or ``predict`` (predict() of 101
samples, batch 8, over that loader, put in dataset order with
integrations.accelerate.in_dataset_order); argv[2]: the output folder.
Each rank reports the sample ids its training_step saw per epoch, and the evaluation ids."""
import os
import sys

import numpy as np
import torch
import transformers
from harness import report
from toy_data import Mapped

import horovod_iter as hi

case, folder = sys.argv[1], sys.argv[2]
N, VAL = 64, {"eval_pad": 17, "predict": 101}.get(case, 18)


def Ids(n):  # a dataset of these samples
    return Mapped(n, lambda i: {"input_ids": torch.tensor([1 + i % 40, 2, 3]),
                                "labels": torch.tensor(i % 2), "idx": torch.tensor(i)})


seen, evaluated = {}, []


class Stop(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if case == "save" and state.global_step == 11:
            control.should_training_stop = True


class Trainer(transformers.Trainer):
    def get_train_dataloader(self):
        return hi.DistributedLoader(self.train_dataset, batch_size=4, timeout=60)

    def get_eval_dataloader(self, eval_dataset=None):
        if case != "eval_pad":
            return super().get_eval_dataloader(eval_dataset)
        return hi.DistributedLoader(self.eval_dataset, batch_size=4, shuffle=False,
                                    uneven="pad", even_batches=True,
                                    mark_padding=hi.mask_labels(), timeout=60)

    def get_test_dataloader(self, test_dataset):  # the evaluation recipe's loader
        return hi.DistributedLoader(test_dataset, batch_size=8, shuffle=False,
                                    uneven="pad", even_batches=True,
                                    mark_padding=hi.mask_labels(), timeout=60)

    def training_step(self, model, inputs, *a, **kw):
        epoch = str(int(self.state.epoch or 0))
        seen.setdefault(epoch, []).extend(inputs.pop("idx").tolist())
        return super().training_step(model, inputs, *a, **kw)

    def prediction_step(self, model, inputs, *a, **kw):
        idx = inputs.pop("idx", None)
        if idx is not None and case in ("eval_pad", "predict"):
            idx = idx[inputs["labels"] != -100]  # the copies even_batches adds are marked
        evaluated.extend([] if idx is None else idx.tolist())
        if idx is None:
            print(f"rank {os.environ['RANK']}: eval batch without idx: {inputs}", flush=True)
        return super().prediction_step(model, inputs, *a, **kw)


def compute_metrics(p):  # HF's recipe: rows labelled -100 are not samples
    keep = p.label_ids != -100
    return {"count": int(keep.sum()),
            "accuracy": float((np.argmax(p.predictions, -1)[keep] == p.label_ids[keep]).mean())}


config = transformers.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=16,
                                 max_position_embeddings=8, num_labels=2)
torch.manual_seed(0)
model = transformers.BertForSequenceClassification(config)
args = transformers.TrainingArguments(
    output_dir=folder, num_train_epochs=2, per_device_train_batch_size=4, use_cpu=True,
    report_to=[], save_strategy="steps" if case == "save" else "no", save_steps=5,
    logging_strategy="no", disable_tqdm=True, remove_unused_columns=False,
    ddp_backend="gloo", dataloader_num_workers=0)
trainer = Trainer(model=model, args=args, train_dataset=Ids(N), eval_dataset=Ids(VAL),
                  callbacks=[Stop()],
                  compute_metrics=compute_metrics if case == "eval_pad" else None)
out = {}
if case == "resume":
    trainer.train(resume_from_checkpoint=True)
elif case == "predict":
    from horovod_iter.integrations.accelerate import in_dataset_order

    test_set = Ids(VAL)
    pred = trainer.predict(test_set)
    out["raw_rows"] = len(pred.predictions)
    logits, labels = in_dataset_order((pred.predictions, pred.label_ids),
                                      trainer.get_test_dataloader(test_set))
    out["rows"] = len(logits)
    out["labels_in_order"] = labels.tolist() == [i % 2 for i in range(VAL)]
    model.eval()
    with torch.no_grad():  # the model's own prediction for each sample, one at a time
        ref = torch.cat([model(input_ids=test_set[i]["input_ids"][None]).logits
                         for i in range(VAL)])
    out["preds_match"] = bool(np.allclose(logits, ref.numpy(), atol=1e-5))
elif case != "eval_pad":
    trainer.train()
metrics = trainer.evaluate() if case in ("train", "eval_pad") else {}
report({"rank": int(os.environ["RANK"]), "world": int(os.environ["WORLD_SIZE"]), "seen": seen,
        "eval": evaluated, "eval_loss": metrics.get("eval_loss"),
        "eval_count": metrics.get("eval_count"), **out})
sys.stdout.flush()
os._exit(0)
