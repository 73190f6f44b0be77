#!/usr/bin/env python3
"""PyTorch CPU baseline for the Rust CPU benchmarks in benches/cpu.rs.

Measures, on the CPU with torch.set_num_threads(2), the median wall time
(time.perf_counter, after warm-up runs) of:

  a. conv3d forward: input [2, 16, 64, 64, 32] (N, C, X, Y, Z),
     nn.Conv3d(16, 16, 3, padding=1, bias=True), under torch.no_grad().
  b. conv3d fwd+bwd(weights): forward, then backward of a fixed output
     gradient with only the weight and bias needing gradients (input has
     requires_grad=False, as for a first layer).
  c. conv3d fwd+bwd(weights+input): the same, with the input gradient too
     (as for every inner layer).
  d. A whole vox2vec pretraining step at a small size (docs/method.md
     sections 3-4): FPN3d(in_channels=1, base_channels=16, num_scales=6),
     projection head 1008 -> 1008 -> 1008 -> 128 + L2 normalisation,
     InfoNCE at t = 0.1, Adam lr 3e-4, gradient clipping to norm 1.0.
     Batch: 2 view pairs of 32x32x16 patches (x1, x2: [2, 1, 32, 32, 16]),
     64 random positive voxel pairs per view pair. Timed: zero_grad, both
     backbone passes (one per view), head, loss, backward, clip, Adam step.

  e. With --device cuda: the step of (d) on the GPU (no thread setting), at
     --size small (d's batch) or --size reference (10 pairs of 128x128x32,
     1024 voxels per pair: the batch of `vox2vec-train --bench`), timed with
     torch.cuda.synchronize() around each step; also prints the peak memory
     (torch.cuda.max_memory_allocated). --precision bf16 runs it as PyTorch runs
     fastest: bf16 autocast, channels_last_3d inputs and weights, cudnn.benchmark
     (the comparison for `vox2vec-train --bench --precision bf16`).

  f. --only infer: the eval-mode pyramid of [B, 1, 128, 128, 32] windows (what `vox2vec
     embed` runs per window, `vox2vec bench-infer` times), patches/s per batch (--batches);
     on CUDA in fp32 and in bf16 autocast with channels_last_3d and cudnn.benchmark.

Run (needs torch; a CPU-only machine is fine):

    python3 dev/pytorch_reference.py            # full measurement
    python3 dev/pytorch_reference.py --quick    # 1 warm-up, 2 timed runs (smoke test)
    python3 dev/pytorch_reference.py --only step   # one group (conv3d or step)
    python3 dev/pytorch_reference.py --device cuda --only step --size reference
    python3 dev/pytorch_reference.py --device cuda --only step --size reference --precision bf16
    python3 dev/pytorch_reference.py --only infer --batches 1,2

Output: the torch version, the thread count, then one line per measurement,
e.g. `pytorch conv3d forward: median 46.1 ms`.
"""

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

THREADS = 2


# ---------------------------------------------------------------------------
# Model (module tree mirrors the reference state_dict keys, docs/method.md §3)
# ---------------------------------------------------------------------------


class ResBlock3d(nn.Module):
    """y = conv(relu(bn(conv(relu(bn(x)))))) + skip(x)."""

    def __init__(self, cin, cout, k=3):
        super().__init__()
        mid = min(cin, cout)
        pad = k // 2
        self.layers = nn.Sequential(
            nn.BatchNorm3d(cin),  # 0
            nn.ReLU(inplace=True),  # 1
            nn.Conv3d(cin, mid, k, padding=pad),  # 2
            nn.BatchNorm3d(mid),  # 3
            nn.ReLU(inplace=True),  # 4
            nn.Conv3d(mid, cout, k, padding=pad),  # 5
        )
        self.skip = nn.Identity() if cin == cout else nn.Conv3d(cin, cout, 1)

    def forward(self, x):
        # skip(x) must be taken before the in-place ReLU could touch x; the first
        # ReLU acts on bn(x), a new tensor, so x itself is never modified.
        return self.layers(x) + self.skip(x)


class Stack(nn.Module):
    """Two ResBlocks c -> c."""

    def __init__(self, c, k=3):
        super().__init__()
        self.layers = nn.Sequential(ResBlock3d(c, c, k), ResBlock3d(c, c, k))

    def forward(self, x):
        return self.layers(x)


def crop_to(x, shape):
    """Crop the spatial dims of x (N, C, X, Y, Z) to `shape`."""
    return x[:, :, : shape[0], : shape[1], : shape[2]]


class FPN3d(nn.Module):
    def __init__(self, in_channels=1, base_channels=16, num_scales=6):
        super().__init__()
        chans = [base_channels * 2**i for i in range(num_scales)]
        self.first_conv = nn.Conv3d(in_channels, base_channels, 3, padding=1)
        self.left_blocks = nn.ModuleList(Stack(c) for c in chans[:-1])
        self.down_blocks = nn.ModuleList(
            nn.Sequential(nn.MaxPool3d(2, ceil_mode=True), nn.Conv3d(c, 2 * c, 1)) for c in chans[:-1]
        )
        self.bottom_block = Stack(chans[-1])
        # Ordered from the coarsest decoder level (level num_scales-2) to level 0.
        dec = list(reversed(chans[:-1]))
        self.up_blocks = nn.ModuleList(
            nn.Sequential(nn.Conv3d(2 * c, c, 1), nn.Upsample(scale_factor=2, mode="nearest")) for c in dec
        )
        self.skip_blocks = nn.ModuleList(nn.Conv3d(c, c, 1) for c in dec)
        self.right_blocks = nn.ModuleList(Stack(c) for c in dec)

    def forward(self, x):
        x = self.first_conv(x)
        skips = []
        for left, down in zip(self.left_blocks, self.down_blocks):
            x = left(x)
            skips.append(x)
            x = down(x)
        x = self.bottom_block(x)
        pyramid = [x]
        for up, skip_block, right, f in zip(self.up_blocks, self.skip_blocks, self.right_blocks, reversed(skips)):
            x = crop_to(up(x), f.shape[2:]) + skip_block(f)
            x = right(x)
            pyramid.append(x)
        return pyramid[::-1]  # level 0 (finest) first


def gather_embeddings(pyramid, b, v):
    """Concatenate pyramid_i[b, :, floor(v / 2^i)] over levels i -> [N, sum(channels)]."""
    feats = []
    for i, fmap in enumerate(pyramid):
        vi = torch.div(v, 2**i, rounding_mode="floor")
        feats.append(fmap[b, :, vi[:, 0], vi[:, 1], vi[:, 2]])  # advanced indexing -> [N, C]
    return torch.cat(feats, dim=1)


def projection_head(dim_in, dim_hidden, dim_out=128):
    return nn.Sequential(
        nn.Linear(dim_in, dim_hidden),  # 0
        nn.BatchNorm1d(dim_hidden),  # 1
        nn.ReLU(inplace=True),  # 2
        nn.Linear(dim_hidden, dim_hidden),  # 3
        nn.BatchNorm1d(dim_hidden),  # 4
        nn.ReLU(inplace=True),  # 5
        nn.Linear(dim_hidden, dim_out),  # 6
    )


def info_nce(e1, e2, t=0.1):
    n = e1.shape[0]
    diag = torch.eye(n, dtype=torch.bool, device=e1.device)
    l11 = (e1 @ e1.T / t).masked_fill(diag, float("-inf"))
    l22 = (e2 @ e2.T / t).masked_fill(diag, float("-inf"))
    l12 = e1 @ e2.T / t
    pos = torch.diagonal(l12)
    loss_1 = (-pos + torch.logsumexp(torch.cat([l11, l12], dim=1), dim=1)).mean()
    loss_2 = (-pos + torch.logsumexp(torch.cat([l12.T, l22], dim=1), dim=1)).mean()
    return (loss_1 + loss_2) / 2


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


def reference_step(backbone, head, opt, params, x1, x2, b, v1, v2, bf16=False):
    """One reference pretraining step (docs/method.md §4): both views' embeddings, InfoNCE at
    0.1, backward, global-norm clip at 1.0, Adam. Returns the loss. bf16: the whole forward,
    loss included, under CUDA bf16 autocast, as a PyTorch user writes it (autocast itself
    keeps normalisation and logsumexp in fp32)."""
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        e1 = F.normalize(head(gather_embeddings(backbone(x1), b, v1)), dim=1)
        e2 = F.normalize(head(gather_embeddings(backbone(x2), b, v2)), dim=1)
        loss = info_nce(e1, e2, 0.1)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_ms(fn, warmup, runs):
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def report(name, ms):
    print(f"pytorch {name}: median {ms:.1f} ms", flush=True)


def bench_conv3d(warmup, runs):
    conv = nn.Conv3d(16, 16, 3, padding=1, bias=True)
    x = torch.randn(2, 16, 64, 64, 32)
    dy = torch.randn(2, 16, 64, 64, 32)

    def forward():
        with torch.no_grad():
            conv(x)

    def fwd_bwd_weights():
        conv.zero_grad(set_to_none=True)
        conv(x).backward(dy)

    x_req = x.clone().requires_grad_(True)

    def fwd_bwd_full():
        conv.zero_grad(set_to_none=True)
        x_req.grad = None
        conv(x_req).backward(dy)

    report("conv3d forward", median_ms(forward, warmup, runs))
    report("conv3d fwd+bwd(weights)", median_ms(fwd_bwd_weights, warmup, runs))
    report("conv3d fwd+bwd(weights+input)", median_ms(fwd_bwd_full, warmup, runs))


def bench_pretrain_step(warmup, runs, device="cpu", size="small", precision="fp32"):
    if size == "reference":
        pairs, patch, voxels_per_pair = 10, (128, 128, 32), 1024
    else:
        pairs, patch, voxels_per_pair = 2, (32, 32, 16), 64
    base, scales = 16, 6
    backbone = FPN3d(1, base, scales).to(device)
    emb_dim = base * (2**scales - 1)  # 1008
    head = projection_head(emb_dim, emb_dim, 128).to(device)
    bf16 = precision == "bf16"
    if bf16:
        if device != "cuda":
            raise SystemExit("--precision bf16 needs --device cuda")
        torch.backends.cudnn.benchmark = True
        backbone = backbone.to(memory_format=torch.channels_last_3d)
    backbone.train()
    head.train()
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=3e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    x1 = torch.rand(pairs, 1, *patch, device=device)
    x2 = torch.rand(pairs, 1, *patch, device=device)
    n = pairs * voxels_per_pair
    b = torch.arange(pairs, device=device).repeat_interleave(voxels_per_pair)
    hi = torch.tensor(patch, device=device)
    v1 = (torch.rand(n, 3, device=device) * hi).long()
    v2 = (torch.rand(n, 3, device=device) * hi).long()
    if bf16:
        x1 = x1.contiguous(memory_format=torch.channels_last_3d)
        x2 = x2.contiguous(memory_format=torch.channels_last_3d)

    n_backbone = sum(p.numel() for p in backbone.parameters())
    n_head = sum(p.numel() for p in head.parameters())
    print(f"pretrain step: backbone {n_backbone:,} params, head {n_head:,} params, "
          f"{pairs} pairs of {patch}, {n} positive voxel pairs", flush=True)

    def step():
        return reference_step(backbone, head, opt, params, x1, x2, b, v1, v2, bf16)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ms = median_ms(step, warmup, runs)
    where = f" on {torch.cuda.get_device_name()}" if device == "cuda" else ""
    mode = ", bf16 autocast + channels_last_3d + cudnn.benchmark" if bf16 else ", fp32"
    report(f"pretrain step ({pairs}x{patch[0]}x{patch[1]}x{patch[2]}, {voxels_per_pair} voxels/pair, base 16, 6 scales{mode}){where}", ms)
    if device == "cuda":
        print(f"pytorch peak memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)


def bench_infer(warmup, runs, device="cpu", batches=(1, 8), precisions=("fp32",), patch=(128, 128, 32)):
    """f. The eval-mode pyramid (what `vox2vec embed` runs per sliding window): FPN3d(1, 16, 6)
    in eval mode under torch.inference_mode() on [B, 1, 128, 128, 32] inputs, every level
    computed; on CUDA also bf16 autocast with channels_last_3d and cudnn.benchmark (the
    fastest PyTorch settings); timed with a synchronisation after each pass. Prints ms per
    pass and patches/s per (precision, batch), as `vox2vec bench-infer` does."""
    backbone = FPN3d(1, 16, 6).to(device).eval()
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    for precision in precisions:
        if precision == "bf16" and device != "cuda":
            print("pytorch infer bf16: skipped on the CPU", flush=True)
            continue
        model = backbone
        if device == "cuda" and precision == "bf16":
            model = backbone.to(memory_format=torch.channels_last_3d)
        for b in batches:
            x = torch.rand(b, 1, *patch, device=device)
            if device == "cuda" and precision == "bf16":
                x = x.to(memory_format=torch.channels_last_3d)

            def run():
                with torch.inference_mode():
                    if device == "cuda" and precision == "bf16":
                        with torch.autocast("cuda", dtype=torch.bfloat16):
                            model(x)
                    else:
                        model(x)

            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            ms = median_ms(run, warmup, runs)
            extra = f", peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device == "cuda" else ""
            print(f"pytorch infer {precision} batch {b} ({patch[0]}x{patch[1]}x{patch[2]}): median {ms:.1f} ms per pass, "
                  f"{b / (ms / 1e3):.2f} patches/s{extra}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 warm-up and 2 timed runs each (smoke test)")
    ap.add_argument("--only", choices=["conv3d", "step", "infer"], help="run one group of measurements")
    ap.add_argument("--batches", default="1,8", help="window batches of the infer group (comma-separated)")
    ap.add_argument("--runs", type=int, help="timed runs per measurement (default: 20 conv3d, 10 step, 5 infer)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the step runs (conv3d is CPU only)")
    ap.add_argument("--size", choices=["small", "reference"], default="small", help="the step's batch")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="the step's arithmetic: fp32, or bf16 autocast with channels_last_3d (CUDA only)")
    args = ap.parse_args()

    if args.device == "cpu":
        torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    if args.quick:
        conv_warmup, conv_runs, step_warmup, step_runs = 1, 2, 1, 2
    else:
        conv_warmup, conv_runs, step_warmup, step_runs = 3, 20, 3, 10
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}"
          f"{' (quick mode: timings not meaningful)' if args.quick else ''}", flush=True)

    if args.only in (None, "conv3d") and args.device == "cpu":
        bench_conv3d(conv_warmup, conv_runs)
    if args.only in (None, "step"):
        bench_pretrain_step(step_warmup, args.runs or step_runs, args.device, args.size, args.precision)
    if args.only in (None, "infer"):
        batches = [int(b) for b in args.batches.split(",")]
        precisions = ("fp32", "bf16") if args.device == "cuda" else ("fp32",)
        bench_infer(1 if args.quick else 2, args.runs or (2 if args.quick else 5), args.device, batches, precisions)


if __name__ == "__main__":
    main()
