#!/usr/bin/env python3
"""Our CPU backend and PyTorch's, interleaved in one run, on the same shapes.

For every row, `rounds` times: our run (target/release/examples/cpu_bench ROW, a fresh
process, median of --reps after a warm-up) then PyTorch's (in this process, same shape, same
reps, torch.set_num_threads(--threads)). Prints per row the range of our medians, of
PyTorch's, and the ratio PyTorch / ours (above 1: we are faster), and writes the same as a
Markdown table with --markdown FILE. This machine's speed drifts over minutes, which is why
the two alternate instead of running one after the other.

    cargo build --release --example cpu_bench
    python3 dev/cpu_side_by_side.py [--rounds 2] [--reps 5] [--rows conv,step,eval] [--markdown FILE]

Rows: conv3d 3x3x3 C -> C with bias, forward / forward + backward (input, weight, bias) /
forward + backward of the weights only, at the issue's (2, 16, 64, 64, 32) and at the first
three pyramid levels of one 128x128x32 window (16, 32, 64 channels); the small pretraining
step (2 pairs of 32x32x16, base 16, 6 scales, 64 voxels per pair); the eval-mode pyramid of
one 128x128x32 window. Needs torch (CPU is enough).
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_reference import FPN3d, projection_head, reference_step  # noqa: E402

CONV_SHAPES = [(2, 16, 64, 64, 32), (1, 16, 128, 128, 32), (1, 32, 64, 64, 16), (1, 64, 32, 32, 8)]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rows(groups):
    out = []
    if "conv" in groups:
        for s in CONV_SHAPES:
            shape = ",".join(map(str, s))
            out += [f"conv_fwd:{shape}", f"conv_fwd_bwd:{shape}", f"conv_fwd_bwd_w:{shape}"]
    if "step" in groups:
        out.append("step_small")
    if "eval" in groups:
        out.append("eval_pyramid")
    return out


def torch_runner(row):
    name, _, dims = row.partition(":")
    if name.startswith("conv"):
        n, c, x, y, z = map(int, dims.split(","))
        conv = nn.Conv3d(c, c, 3, padding=1, bias=True)
        inp = torch.randn(n, c, x, y, z)
        dy = torch.randn(n, c, x, y, z)
        if name == "conv_fwd":
            def run():
                with torch.no_grad():
                    conv(inp)
            return run
        need_input = name == "conv_fwd_bwd"

        def run():
            conv.zero_grad(set_to_none=True)
            xi = inp.clone().requires_grad_(need_input)
            conv(xi).backward(dy)
        return run
    if name == "step_small":
        backbone = FPN3d(1, 16, 6)
        head = projection_head(1008, 1008, 128)
        params = list(backbone.parameters()) + list(head.parameters())
        opt = torch.optim.Adam(params, lr=3e-4)
        x1, x2 = torch.rand(2, 1, 32, 32, 16), torch.rand(2, 1, 32, 32, 16)
        b = torch.arange(2).repeat_interleave(64)
        v1 = (torch.rand(128, 3) * torch.tensor([32, 32, 16])).long()
        v2 = (torch.rand(128, 3) * torch.tensor([32, 32, 16])).long()

        def run():
            reference_step(backbone, head, opt, params, x1, x2, b, v1, v2)
        return run
    if name == "eval_pyramid":
        backbone = FPN3d(1, 16, 6).eval()
        x = torch.rand(1, 1, 128, 128, 32)

        def run():
            with torch.inference_mode():
                backbone(x)
        return run
    raise ValueError(row)


def time_torch(run, reps):
    run()
    ms = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        ms.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(ms)


def time_ours(row, reps, kernels):
    cmd = [os.path.join(ROOT, "target/release/examples/cpu_bench"), row, "--reps", str(reps)]
    if kernels:
        cmd += ["--kernels", kernels]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()
    return float(out[1])


# glibc's malloc hands blocks above its mmap threshold (at most 32 MiB) back to the kernel on
# free, so in a fresh process every 33 MB activation of the 128x128x32 level is faulted in and
# zeroed again: PyTorch's eval pyramid took 1005-1054 ms that way against 594-643 ms with the
# blocks kept (measured on this repository's 2-vCPU Xeon). Our binaries keep freed memory
# (`cpu::retain_freed_memory`); PyTorch gets the same here, through glibc's own settings.
MALLOC_KEEP = {"MALLOC_MMAP_THRESHOLD_": "2000000000", "MALLOC_TRIM_THRESHOLD_": "4000000000", "MALLOC_TOP_PAD_": "1000000000"}


def main():
    if any(os.environ.get(k) != v for k, v in MALLOC_KEEP.items()):
        os.environ.update(MALLOC_KEEP)  # read by glibc at start-up: run again with them set
        os.execv(sys.executable, [sys.executable] + sys.argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="conv,step,eval", help="groups: conv, step, eval")
    ap.add_argument("--kernels", help="our CPU kernel set (portable, avx2, avx512; default the best available)")
    ap.add_argument("--markdown", help="also write the table here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ours with {os.cpu_count()} CPUs visible", flush=True)
    table = []
    for row in rows(args.rows.split(",")):
        runner = torch_runner(row)
        ours, theirs = [], []
        for _ in range(args.rounds):
            ours.append(time_ours(row, args.reps, args.kernels))
            theirs.append(time_torch(runner, args.reps))
        ratio_lo, ratio_hi = min(theirs) / max(ours), max(theirs) / min(ours)
        line = (row, f"{min(ours):.1f}-{max(ours):.1f}", f"{min(theirs):.1f}-{max(theirs):.1f}", f"{ratio_lo:.2f}-{ratio_hi:.2f}")
        table.append(line)
        print(f"{line[0]:<36} ours {line[1]:>15} ms   PyTorch {line[2]:>15} ms   PyTorch/ours {line[3]}", flush=True)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("| row | vox2vec-rs ms | PyTorch ms | PyTorch / ours |\n| --- | ---: | ---: | ---: |\n")
            for line in table:
                f.write(f"| {line[0]} | {line[1]} | {line[2]} | {line[3]} |\n")


if __name__ == "__main__":
    main()
