#!/usr/bin/env python3
"""How far do `vox2vec similar` matches of anatomical points land between different patients?

For one query patient of an nnU-Net dataset (default: OpenKBP pt_13) and each labelled organ,
the query point is the organ's voxel nearest to its centroid. `vox2vec similar` finds the best
match in each target patient; a match is scored by the target's own labels: whether it lands
inside the same organ, and its distance (mm) to the nearest voxel of that organ. Each backbone
given is run on the same points, so a random and a trained backbone can be compared.

  python3 dev/similar_landmarks.py --weights random=R.safetensors trained=T.safetensors \\
      [--dataset ../shared/data/Dataset001_OpenKBP] [--query pt_13] [--targets pt_34,pt_61,pt_87] \\
      [--flags "--override-recorded --spacing 3,3,3 --patch 64,64,32"] [--out runs/similar_landmarks]

Needs numpy and nibabel (pip) and a built `target/release/vox2vec`.
"""
import argparse
import json
import pathlib
import shlex
import subprocess

import nibabel as nib
import numpy as np


def main():
    root = pathlib.Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", nargs="+", required=True, help="LABEL=FILE ...")
    ap.add_argument("--dataset", default=str(root.parent / "shared/data/Dataset001_OpenKBP"))
    ap.add_argument("--query", default="pt_13")
    ap.add_argument("--targets", default="pt_34,pt_61,pt_87")
    ap.add_argument("--flags", default="", help="extra flags for vox2vec similar (per backbone label: LABEL:FLAGS;...)")
    ap.add_argument("--out", default=str(root / "runs/similar_landmarks"))
    ap.add_argument("--bin", default=str(root / "target/release/vox2vec"))
    a = ap.parse_args()
    ds = pathlib.Path(a.dataset)
    classes = {int(v): k for k, v in json.loads((ds / "dataset.json").read_text())["labels"].items() if int(v) > 0}
    image = lambda case: ds / "imagesTr" / f"{case}_0000.nii.gz"
    labels = lambda case: nib.load(str(ds / "labelsTr" / f"{case}.nii.gz"))
    targets = a.targets.split(",")
    q = np.asarray(labels(a.query).dataobj)
    flags = {}
    for part in filter(None, a.flags.split(";")):
        label, _, f = part.partition(":") if ":" in part else ("*", "", part)
        flags[label] = shlex.split(f)
    target_labels = {t: labels(t) for t in targets}
    results = {}
    for spec in a.weights:
        label, path = spec.split("=", 1)
        rows = []
        for c, name in sorted(classes.items()):
            idx = np.argwhere(q == c)
            if len(idx) == 0:
                continue
            point = idx[np.argmin(((idx - idx.mean(0)) ** 2).sum(1))]
            out = pathlib.Path(a.out) / label / name
            cmd = [a.bin, "similar", "--weights", path, "--query", str(image(a.query)), "--point", ",".join(map(str, point)), "--target", *map(str, map(image, targets)), "--out", str(out)]
            cmd += flags.get(label, flags.get("*", []))
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            m = json.loads((out / "matches.json").read_text())
            for t, match in zip(targets, m["matches"]):
                img = target_labels[t]
                lab = np.asarray(img.dataobj)
                v = np.clip(np.round(match["best_voxel"]).astype(int), 0, np.array(lab.shape) - 1)
                organ = np.argwhere(lab == c)
                zooms = np.array(img.header.get_zooms()[:3])
                dist = float(np.sqrt((((organ - v) * zooms) ** 2).sum(1)).min()) if len(organ) else float("nan")
                rows.append({"organ": name, "target": t, "inside": int(lab[tuple(v)] == c), "distance_mm": dist, "similarity": match["similarity"]})
        results[label] = rows
    print(f"query {a.query}, targets {', '.join(targets)}: matches inside the same organ, median distance to it (mm)")
    print("| organ | " + " | ".join(results) + " |")
    print("|---|" + "---:|" * len(results))
    organs = [r["organ"] for r in next(iter(results.values()))][:: len(targets)]
    for organ in organs:
        cells = []
        for rows in results.values():
            rs = [r for r in rows if r["organ"] == organ]
            cells.append(f"{sum(r['inside'] for r in rs)}/{len(rs)}, {np.median([r['distance_mm'] for r in rs]):.0f} mm")
        print(f"| {organ} | " + " | ".join(cells) + " |")
    cells = []
    for rows in results.values():
        cells.append(f"**{sum(r['inside'] for r in rows)}/{len(rows)}, {np.median([r['distance_mm'] for r in rows]):.0f} mm**")
    print("| **all** | " + " | ".join(cells) + " |")
    pathlib.Path(a.out).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(a.out) / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
