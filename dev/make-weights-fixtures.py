#!/usr/bin/env python3
"""Weights files as PyTorch users publish them, made from the parity fixtures' parameters.

The reference's published checkpoint (`vox2vec_contrastive.pt`) is a plain FPN3d state_dict
written by `torch.save`, with BatchNorm buffers (`num_batches_tracked` int64). Lightning
writes `.ckpt` files: a dict whose `state_dict` holds the LightningModule's weights under its
attribute names (`backbone.`, `proj_head.`), beside the optimiser state and hyper-parameters.
This script writes such files from tests/data/fixtures/*.safetensors (copies of ../shared/fixtures) so that tests can check,
without PyTorch, that `vox2vec embed --weights FILE` with no configuration flags gives the
fixture's eval pyramid:

  <fixture>.pt            torch.save(state_dict), zip container (PyTorch >= 1.6)
  <fixture>_model.ckpt    Lightning-style with the module wrapped once (model.backbone., model.proj_head.)
  fpn_tiny_legacy.pt      the same as .pt in the legacy container (_use_new_zipfile_serialization=False)
  fpn_tiny.ckpt           Lightning-style: state_dict with backbone. / proj_head., optimizer_states, ...

Regenerate (pip: torch (CPU) and safetensors):
  python3 dev/make-weights-fixtures.py [--fixtures tests/data/fixtures] [--out tests/data/weights]
"""
import argparse
import collections
import pathlib

import torch
from safetensors.torch import load_file


def state_dicts(fixture):
    t = load_file(str(fixture))
    backbone = collections.OrderedDict((k[len("param.backbone."):], v.clone()) for k, v in sorted(t.items()) if k.startswith("param.backbone."))
    head = collections.OrderedDict((k[len("param.head."):], v.clone()) for k, v in sorted(t.items()) if k.startswith("param.head."))
    return backbone, head


def lightning(backbone, head, prefix):
    sd = collections.OrderedDict()
    for k, v in backbone.items():
        sd[f"{prefix}backbone.{k}"] = v
    for k, v in head.items():
        sd[f"{prefix}proj_head.{k}"] = v
    trainable = [v for k, v in sd.items() if v.is_floating_point() and not k.endswith(("running_mean", "running_var"))]
    # Adam's state for a few parameters only: realistic structure, small files.
    state = {i: {"step": torch.tensor(1200.0), "exp_avg": torch.full_like(p, 1e-3), "exp_avg_sq": torch.full_like(p, 1e-6)} for i, p in enumerate(trainable[:4])}
    return {
        "epoch": 3,
        "global_step": 1200,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": sd,
        "loops": {},
        "callbacks": {},
        "optimizer_states": [{"state": state, "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0, "params": list(state)}]}],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {"base_channels": int(backbone["first_conv.weight"].shape[0]), "proj_dim": int(head["6.weight"].shape[0]), "temp": 0.1, "lr": 3e-4},
    }


def main():
    root = pathlib.Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default=str(root / "tests" / "data" / "fixtures"))
    ap.add_argument("--out", default=str(root / "tests" / "data" / "weights"))
    a = ap.parse_args()
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for fixture in sorted(pathlib.Path(a.fixtures).glob("*.safetensors")):
        name = fixture.stem
        backbone, head = state_dicts(fixture)
        files = {f"{name}.pt": backbone, f"{name}_model.ckpt": lightning(backbone, head, "model.")}
        if name == "fpn_tiny":  # every container once; the larger fixture only twice (small test data)
            files[f"{name}.ckpt"] = lightning(backbone, head, "")
        for file, obj in files.items():
            torch.save(obj, out / file)
        if name == "fpn_tiny":
            torch.save(backbone, out / f"{name}_legacy.pt", _use_new_zipfile_serialization=False)
            files[f"{name}_legacy.pt"] = backbone
        print(f"{name}: {len(backbone)} backbone tensors, {len(head)} head tensors -> {', '.join(sorted(files))} in {out}")


if __name__ == "__main__":
    main()
