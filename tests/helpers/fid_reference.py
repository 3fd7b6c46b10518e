"""pytorch-fid's side of the FID parity test (tests/integration/test_metrics.py), run with the parity venv's Python.

    python tests/helpers/fid_reference.py WEIGHTS.npz DIR_A DIR_B OUT_DIR

Builds pytorch-fid's own ``InceptionV3`` (its FID blocks on torchvision's Inception3) with the weights of
WEIGHTS.npz (torchvision key names) instead of the released ones: pytorch-fid fetches its weights through
``load_state_dict_from_url``, which is replaced by a function returning these tensors, and loads them
strictly, so a wrong or missing name fails here. Then pytorch-fid's own image reading and statistics:
writes OUT_DIR/features_a.npy, features_b.npy, fid.json ({"fid": value}) and weights.pth (the state dict
as torchvision saves it, for the test of reading .pth files).
"""

import json
import os
import sys

import numpy as np
import torch
from pytorch_fid import fid_score, inception


def main(weights, dir_a, dir_b, out_dir):
    with np.load(weights) as f:
        state = {k: torch.from_numpy(f[k]) for k in f.files}
    inception.load_state_dict_from_url = lambda *args, **kwargs: state
    model = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    feats = []
    for d in (dir_a, dir_b):
        files = sorted(os.path.join(d, n) for n in os.listdir(d) if n.endswith(".png"))
        feats.append(fid_score.get_activations(files, model, batch_size=8, dims=2048, device="cpu", num_workers=0))
    stats = [(f.mean(axis=0), np.cov(f, rowvar=False)) for f in feats]
    fid = fid_score.calculate_frechet_distance(*stats[0], *stats[1])
    np.save(os.path.join(out_dir, "features_a.npy"), feats[0])
    np.save(os.path.join(out_dir, "features_b.npy"), feats[1])
    with open(os.path.join(out_dir, "fid.json"), "w") as f:
        json.dump({"fid": float(fid)}, f)
    full = inception.fid_inception_v3()  # torchvision's Inception3 with the FID blocks: its own state_dict
    torch.save(full.state_dict(), os.path.join(out_dir, "weights.pth"))


if __name__ == "__main__":
    main(*sys.argv[1:5])
