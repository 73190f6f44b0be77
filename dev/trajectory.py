#!/usr/bin/env python3
"""Trajectory parity: PyTorch's reference step trained on exactly our batches.

`vox2vec-train ... --dump-batches DIR` writes the weights it starts from
(DIR/weights_step_000000.safetensors: PyTorch state_dict keys and layouts, `backbone.` and
`head.` prefixes) and every step's batch (DIR/step_<n>/x1.npy, x2.npy: [B, 1, X, Y, Z] float32,
pairs.npy: [N, 7] int64 = patch index, view-1 x y z, view-2 x y z). This script loads the same
weights into the PyTorch modules of dev/pytorch_reference.py (FPN3d, projection head,
InfoNCE as docs/method.md §3-4), then for each dumped step runs the reference step:
both views through the backbone in their own passes (train mode: BatchNorm batch statistics
per view), the head, L2 normalisation, InfoNCE at --temperature, backward, clip_grad_norm_
to 1.0, Adam (lr --lr, betas 0.9/0.999, eps 1e-8) - all in float32 on the CPU - and writes one
JSON line per step: loss, grad_norm (before clipping) and the learning signal (top1, pos_sim,
neg_sim, as ops::infonce::signal_cpu defines them). With --compare METRICS it prints, step by
step, the relative differences to our run's metrics.jsonl and their growth.

    vox2vec-train DATA --dump-batches /tmp/dump ... --out /tmp/run
    python3 dev/trajectory.py /tmp/dump --base-channels 8 --num-scales 4 --out traj.jsonl --compare /tmp/run/metrics.jsonl

Needs torch and numpy (scripts/trajectory.sh makes the committed reference trajectory).
"""

import argparse
import json
import os
import struct
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_reference import FPN3d, gather_embeddings, info_nce, projection_head  # noqa: E402

SIGNAL_ANCHORS = 1024


def read_safetensors(path):
    """{name: numpy array} of a safetensors file (F32 and I64 only), without the package."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = {"F32": np.float32, "I64": np.int64}[info["dtype"]]
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype=dt).reshape(info["shape"]).copy()
    return out


def signal(e1, e2):
    """top-1 over the first min(N, 1024) anchors of each view (own pair strictly the most
    similar), mean positive and mean cross-view negative similarity."""
    n = e1.shape[0]
    a = min(n, SIGNAL_ANCHORS)
    hits = 0
    for p, q in ((e1, e2), (e2, e1)):
        s = p[:a] @ q.T
        diag = s[torch.arange(a), torch.arange(a)]
        s[torch.arange(a), torch.arange(a)] = float("-inf")
        hits += int((diag > s.max(dim=1).values).sum())
    e1d, e2d = e1.double(), e2.double()
    pos = float((e1d * e2d).sum())
    cross = float(e1d.sum(0) @ e2d.sum(0))
    return hits / (2 * a), pos / n, (cross - pos) / (n * (n - 1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dump", help="the --dump-batches folder of a vox2vec-train run")
    ap.add_argument("--base-channels", type=int, default=16)
    ap.add_argument("--num-scales", type=int, default=6)
    ap.add_argument("--proj-dim", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="write the trajectory (JSON lines) here")
    ap.add_argument("--compare", help="our run's metrics.jsonl: print the step-by-step differences")
    ap.add_argument("--double", action="store_true", help="train in float64 instead (the rounding-free trajectory both fp32 runs drift from)")
    ap.add_argument("--steps", type=int, help="only the first N dumped steps")
    ap.add_argument("--save-state", help="write the trained state_dict (backbone. and head. keys) to this .npz at the end")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    backbone = FPN3d(1, args.base_channels, args.num_scales)
    dim = args.base_channels * (2**args.num_scales - 1)
    head = projection_head(dim, dim, args.proj_dim)
    weights = read_safetensors(os.path.join(args.dump, "weights_step_000000.safetensors"))
    for module, prefix in ((backbone, "backbone."), (head, "head.")):
        state = {k[len(prefix):]: torch.from_numpy(v) for k, v in weights.items() if k.startswith(prefix)}
        module.load_state_dict(state, strict=True)  # every key, every shape, or an error
    if args.double:
        backbone.double()
        head.double()
    backbone.train()
    head.train()
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    steps = sorted(d for d in os.listdir(args.dump) if d.startswith("step_"))[: args.steps]
    dtype = torch.float64 if args.double else torch.float32
    lines = []
    for name in steps:
        d = os.path.join(args.dump, name)
        x1 = torch.from_numpy(np.load(os.path.join(d, "x1.npy"))).to(dtype)
        x2 = torch.from_numpy(np.load(os.path.join(d, "x2.npy"))).to(dtype)
        pairs = torch.from_numpy(np.load(os.path.join(d, "pairs.npy")))
        b, v1, v2 = pairs[:, 0], pairs[:, 1:4], pairs[:, 4:7]
        opt.zero_grad(set_to_none=True)
        e1 = F.normalize(head(gather_embeddings(backbone(x1), b, v1)), dim=1)
        e2 = F.normalize(head(gather_embeddings(backbone(x2), b, v2)), dim=1)
        loss = info_nce(e1, e2, args.temperature)
        with torch.no_grad():
            top1, pos, neg = signal(e1.detach(), e2.detach())
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        opt.step()
        line = {"step": int(name[5:]), "loss": float(loss), "grad_norm": norm, "top1": top1, "pos_sim": pos, "neg_sim": neg}
        lines.append(line)
        print(json.dumps(line), flush=True)
    if args.save_state:
        state = {"backbone." + k: v.detach().numpy() for k, v in backbone.state_dict().items()}
        state.update({"head." + k: v.detach().numpy() for k, v in head.state_dict().items()})
        np.savez(args.save_state, **state)
    if args.out:
        with open(args.out, "w") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")
    if args.compare:
        ours = {}
        with open(args.compare) as f:
            for l in f:
                v = json.loads(l)
                if "loss" in v:
                    ours[v["step"]] = v
        worst_loss = worst_norm = 0.0
        print(f"{'step':>5} {'loss torch':>12} {'loss ours':>12} {'rel diff':>9} {'norm rel diff':>13}")
        for line in lines:
            o = ours.get(line["step"])
            if o is None:
                continue
            dl = abs(o["loss"] - line["loss"]) / abs(line["loss"])
            dn = abs(o["grad_norm"] - line["grad_norm"]) / abs(line["grad_norm"])
            worst_loss, worst_norm = max(worst_loss, dl), max(worst_norm, dn)
            print(f"{line['step']:>5} {line['loss']:>12.6f} {o['loss']:>12.6f} {dl:>9.2e} {dn:>13.2e}")
        print(f"largest relative difference: loss {worst_loss:.2e}, gradient norm {worst_norm:.2e}")


if __name__ == "__main__":
    main()
