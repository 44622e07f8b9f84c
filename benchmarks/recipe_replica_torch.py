"""A PyTorch transcription of the scratch CNN's recipe (`train.arch: fast`), to rank recipe
changes over many seeds on a GPU in minutes; the Keras stage is what users run.

Same net (frozen 2x2 patch whitening, 64/256/256 convs initialised as partial identities,
BatchNorm with shift only, 8x shift learning rate, momentum 0.6; GELU; global max pool;
bias-free head, logits / 9), same optimizer as Keras' SGD (Nesterov, decoupled weight decay
applied first, lr * weight_decay per step), same warm-up + cosine schedule, label smoothing,
random flip, 2 px reflect shifts, 8 px mean-filled cutout, best validation epoch, flip+shift
TTA, bfloat16 autocast. Calibration on CIFAR-10 (JPEG rebuild), the 26-epoch recipe: replica 3
seeds best validation 90.54%, test 91.08%; Keras on the 2-core CPU 90.79%, 91.53%. Each
run optionally keeps an EMA of the weights and buffers, evaluated beside the raw weights.
With `lookahead` > 0, airbench's Lookahead as `train.lookahead` does it. With `muon_lr` set,
the conv filters train by Muon instead (`train.optimizer: muon`).

    pip install torch==2.13.0   # any recent torch; not a dependency of the pipeline
    python benchmarks/recipe_replica_torch.py data/prepared configs.json results.jsonl

configs.json is a list of overrides of BASE (one run each, e.g. {"ls": 0.1, "seed": 3});
results.jsonl gets one line per run. docs/scratch.md, "Choosing the recipe", has what it measured
(runs of 8-10 such processes side by side on one H100, about 90 s a run).
"""
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BASE = dict(epochs=26, batch=256, lr=0.375, momentum=0.85, wd=0.0089, ls=0.2, warmup=3, flip="random",
            shift=2, cutout=8, widths=[64, 256, 256], bn_mom=0.6, shift_scale=8.0, logit_scale=1 / 9,
            ema=None, ema_every=5, trainval=False, seed=0, limit=None, lookahead=0.0, whiten_eps=5e-4,
            eval_every=1, muon_lr=None, muon_momentum=0.6, ns_steps=3)
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def orthogonalise(g, steps):
    """Muon's quintic Newton-Schulz iteration (cifar_pipeline.muon.orthogonalise), in float32."""
    a, b, c = NEWTON_SCHULZ
    x = g.t() if g.size(0) > g.size(1) else g
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        gram = x @ x.t()
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.t() if g.size(0) > g.size(1) else x


def muon_step(filters, grads, buffers, lr, cfg):
    """train.optimizer: muon on the conv filters (cifar_pipeline.muon.ConvMuon): rescale each kernel
    to norm sqrt(out channels), then step along the orthogonalised Nesterov momentum."""
    m = cfg["muon_momentum"]
    for w, g, buf in zip(filters, grads, buffers):
        buf.mul_(m).add_(g)
        update = orthogonalise((g + m * buf).reshape(len(g), -1), cfg["ns_steps"]).view_as(w)
        w.mul_(len(w) ** 0.5 / w.norm()).sub_(update, alpha=lr * cfg["muon_lr"] / cfg["lr"])


def glorot(shape_khwio, gen):
    kh, kw, ci, co = shape_khwio
    limit = math.sqrt(6.0 / (kh * kw * ci + kh * kw * co))
    return (torch.rand(shape_khwio, generator=gen) * 2 - 1) * limit


def partial_identity(kh, kw, ci, co, gen):
    k = glorot((kh, kw, ci, co), gen)
    n = min(ci, co)
    k[..., :n] = 0
    k[kh // 2, kw // 2, torch.arange(n), torch.arange(n)] = 1
    return k.permute(3, 2, 0, 1).contiguous()


def whitening_kernel(images, mean, std, eps):
    x = (images.astype(np.float32) - np.float32(mean)) / np.float32(std)
    w = np.lib.stride_tricks.sliding_window_view(x, (2, 2), axis=(1, 2))
    p = w.transpose(0, 1, 2, 4, 5, 3).reshape(-1, 12).astype(np.float64)
    ev, evec = np.linalg.eigh(np.cov(p, rowvar=False))
    f = evec / np.sqrt(ev + eps)
    k = np.concatenate([f, -f], axis=1).reshape(2, 2, 3, 24).astype(np.float32)
    return torch.from_numpy(k).permute(3, 2, 0, 1).contiguous()


class ShiftBN(nn.Module):
    def __init__(self, c, scale, momentum):
        super().__init__()
        self.scale, self.momentum = scale, momentum
        self.stored_shift = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))
        self.register_buffer("ones", torch.ones(c))  # cuDNN's BN backward fails with weight=None

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.ones, self.scale * self.stored_shift,
                            self.training, 1 - self.momentum, 1e-5)


class Net(nn.Module):
    def __init__(self, cfg, mean, std, sample, gen):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("whiten", whitening_kernel(sample, mean, std, cfg["whiten_eps"]))
        convs, bns = [], []
        ci = 24
        for co in cfg["widths"]:
            convs += [nn.Parameter(partial_identity(3, 3, ci, co, gen)),
                      nn.Parameter(partial_identity(3, 3, co, co, gen))]
            bns += [ShiftBN(co, cfg["shift_scale"], cfg["bn_mom"]), ShiftBN(co, cfg["shift_scale"], cfg["bn_mom"])]
            ci = co
        self.convs = nn.ParameterList(convs)
        self.bns = nn.ModuleList(bns)
        self.head = nn.Parameter(glorot((1, 1, ci, 10), gen)[0, 0].t().contiguous())
        self.logit_scale = cfg["logit_scale"]

    def forward(self, x_uint8_nhwc):
        x = x_uint8_nhwc.permute(0, 3, 1, 2).float()
        x = (x - self.mean) / self.std
        x = x.contiguous(memory_format=torch.channels_last)
        x = F.gelu(F.conv2d(x, self.whiten))
        for i in range(0, len(self.convs), 2):
            x = F.conv2d(x, self.convs[i], padding=1)
            x = F.max_pool2d(x, 2, ceil_mode=True)
            x = F.gelu(self.bns[i](x))
            x = F.conv2d(x, self.convs[i + 1], padding=1)
            x = F.gelu(self.bns[i + 1](x))
        x = torch.amax(x, dim=(2, 3))
        return F.linear(x, self.head).float() * self.logit_scale


def lr_at(step, cfg, steps):
    total = cfg["epochs"] * steps
    warm = min(int(cfg["warmup"] * steps), total - 1)
    if step < warm:
        lo = cfg["lr"] / 10
        return lo + (cfg["lr"] - lo) * step / warm
    d = max(total - warm, 1)
    return cfg["lr"] * 0.5 * (1 + math.cos(math.pi * min(step - warm, d) / d))


def augment(x, cfg, mean_fill, gen):
    n = x.shape[0]
    if cfg["flip"] == "random":
        m = torch.rand(n, device=DEV, generator=gen) < 0.5
        x = torch.where(m[:, None, None, None], x.flip(2), x)
    s = cfg["shift"]
    if s:
        p = F.pad(x.permute(0, 3, 1, 2).float(), (s, s, s, s), mode="reflect")
        off = torch.randint(0, 2 * s + 1, (n, 2), device=DEV, generator=gen)
        rows = off[:, :1] + torch.arange(32, device=DEV)[None]
        cols = off[:, 1:] + torch.arange(32, device=DEV)[None]
        p = p[torch.arange(n, device=DEV)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # n,32,32,C
        x = p.to(torch.uint8)
    c = cfg["cutout"]
    if c:
        cen = torch.randint(0, 32, (n, 2), device=DEV, generator=gen)
        r = torch.arange(32, device=DEV)[None] - (cen[:, :1] - c // 2)
        q = torch.arange(32, device=DEV)[None] - (cen[:, 1:] - c // 2)
        hole = ((r >= 0) & (r < c))[:, :, None, None] & ((q >= 0) & (q < c))[:, None, :, None]
        x = torch.where(hole, mean_fill, x)
    return x


def shift_view(x, d):
    p = F.pad(x.permute(0, 3, 1, 2).float(), (1, 1, 1, 1), mode="reflect").permute(0, 2, 3, 1)
    return p[:, 1 - d:1 - d + 32, 1 - d:1 - d + 32].to(torch.uint8)


@torch.no_grad()
def probs(model, x, tta):
    model.eval()
    views = [x]
    if tta != "none":
        views.append(x.flip(2))
    if tta == "flip_shift":
        views += [shift_view(v, d) for v in list(views) for d in (1, -1)]
    out = 0
    for v in views:
        ps = []
        for i in range(0, len(v), 1000):
            with torch.autocast(DEV, dtype=torch.bfloat16):
                ps.append(torch.softmax(model(v[i:i + 1000]).float(), 1))
        out = out + torch.cat(ps)
    return out / len(views)


def acc(p, y):
    return (p.argmax(1) == y).float().mean().item()


def run(cfg, data, meta):
    cfg = {**BASE, **cfg}
    torch.manual_seed(cfg["seed"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    dgen = torch.Generator(device=DEV).manual_seed(cfg["seed"] + 1000)
    xtr, ytr = data["train"]
    if cfg["trainval"]:
        xtr, ytr = torch.cat([xtr, data["val"][0]]), torch.cat([ytr, data["val"][1]])
    if cfg["limit"]:
        xtr, ytr = xtr[:cfg["limit"]], ytr[:cfg["limit"]]
    sample = data["sample"]
    model = Net(cfg, meta["mean"], meta["std"], sample, gen).to(DEV).to(memory_format=torch.channels_last)
    # With muon_lr, the conv filters step by Muon and SGD takes only the rest (ConvMuon).
    filters = list(model.convs) if cfg["muon_lr"] else []
    params = [p for p in model.parameters() if all(p is not f for f in filters)]
    vel = [torch.zeros_like(p) for p in params]
    filter_buffers = [torch.zeros_like(f) for f in filters]
    ema = None
    if cfg["ema"]:
        ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fill = torch.tensor(np.round(meta["mean"]), dtype=torch.uint8, device=DEV)
    steps = len(ytr) // cfg["batch"]
    step = 0
    best = (-1, None, None)  # val acc, epoch, state
    best_ema = (-1, None, None)
    hist = []
    t0 = time.time()
    for epoch in range(cfg["epochs"]):
        model.train()
        slow = {k: v.detach().clone() for k, v in model.state_dict().items()} if cfg["lookahead"] else None
        order = torch.randperm(len(ytr), device=DEV, generator=dgen)[: steps * cfg["batch"]].view(steps, -1)
        for b in range(steps):
            idx = order[b]
            x = augment(xtr[idx], cfg, fill, dgen)
            y = ytr[idx]
            with torch.autocast(DEV, dtype=torch.bfloat16):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg["ls"])
            grads = torch.autograd.grad(loss, params + filters)
            grads, filter_grads = grads[:len(params)], grads[len(params):]
            lr = lr_at(step, cfg, steps)
            m = cfg["momentum"]
            with torch.no_grad():
                muon_step(filters, filter_grads, filter_buffers, lr, cfg)
                torch._foreach_mul_(params, 1 - lr * cfg["wd"])
                torch._foreach_mul_(vel, m)
                torch._foreach_add_(vel, grads, alpha=-lr)
                torch._foreach_add_(params, vel, alpha=m)
                torch._foreach_add_(params, grads, alpha=-lr)
            step += 1
            if slow is not None and ((b + 1) % 5 == 0 or b == steps - 1):  # train.lookahead (lookahead.Lookahead)
                decay = cfg["lookahead"] * (step / (steps * cfg["epochs"])) ** 3
                with torch.no_grad():
                    for k, v in model.state_dict().items():
                        if v.dtype.is_floating_point:
                            slow[k].lerp_(v, 1 - decay)
                            v.copy_(slow[k])
            if ema is not None and step % cfg["ema_every"] == 0:
                decay = cfg["ema"] ** cfg["ema_every"]
                with torch.no_grad():
                    for k, v in model.state_dict().items():
                        if v.dtype.is_floating_point:
                            ema[k].mul_(decay).add_(v, alpha=1 - decay)
        last = epoch == cfg["epochs"] - 1
        if (epoch + 1) % cfg["eval_every"] and not last:
            continue
        va = acc(probs(model, data["val"][0], "none"), data["val"][1])
        rec = {"epoch": epoch + 1, "val": va}
        if va > best[0] or cfg["trainval"]:
            best = (va, epoch + 1, {k: v.clone() for k, v in model.state_dict().items()})
        if ema is not None:
            raw = {k: v.clone() for k, v in model.state_dict().items()}
            model.load_state_dict(ema)
            ve = acc(probs(model, data["val"][0], "none"), data["val"][1])
            rec["val_ema"] = ve
            if ve > best_ema[0] or cfg["trainval"]:
                best_ema = (ve, epoch + 1, {k: v.clone() for k, v in ema.items()})
            model.load_state_dict(raw)
        hist.append(rec)
    train_s = time.time() - t0
    out = {"cfg": {k: v for k, v in cfg.items() if BASE.get(k) != v or k == "seed"}, "train_s": round(train_s, 1)}
    for tag, (va, ep, state) in (("", best), ("ema_", best_ema)):
        if state is None:
            continue
        model.load_state_dict(state)
        xt, yt = data["test"]
        out[tag + "best_val"] = round(va, 4)
        out[tag + "best_epoch"] = ep
        out[tag + "val_fs"] = round(acc(probs(model, data["val"][0], "flip_shift"), data["val"][1]), 4)
        out[tag + "test_none"] = round(acc(probs(model, xt, "none"), yt), 4)
        out[tag + "test_fs"] = round(acc(probs(model, xt, "flip_shift"), yt), 4)
    out["hist"] = [{k: round(v, 4) for k, v in h.items()} for h in hist]
    return out


def main():
    prepared, configs, out_path = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3])
    # Optional: a Unix time after which no new run starts (runs in parallel processes share a time limit).
    meta = json.loads((prepared / "meta.json").read_text())
    data = {}
    for split in ("train", "val", "test"):
        x = torch.from_numpy(np.load(prepared / f"{split}_images.npy")).to(DEV)
        y = torch.from_numpy(np.load(prepared / f"{split}_labels.npy").astype(np.int64)).to(DEV)
        data[split] = (x, y)
    data["sample"] = np.load(prepared / "train_images.npy", mmap_mode="r")[:5000]
    torch.backends.cudnn.benchmark = True
    deadline = float(sys.argv[4]) if len(sys.argv) > 4 else float("inf")
    for cfg in configs:
        if time.time() > deadline:
            print("deadline: skipped", json.dumps(cfg), flush=True)
            continue
        out = run(cfg, data, meta)
        with open(out_path, "a") as f:
            f.write(json.dumps(out) + "\n")
        print(json.dumps({k: v for k, v in out.items() if k != "hist"}), flush=True)


if __name__ == "__main__":
    main()
