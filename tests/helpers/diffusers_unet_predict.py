"""One UNet prediction by diffusers (PyTorch) from an exported folder: the PyTorch half of the real-size export test.

    python tests/helpers/diffusers_unet_predict.py UNET_FOLDER INPUTS.npz RESULT.npy

INPUTS.npz holds ``latents`` (B, 4, h, w), ``timesteps`` (B,) and ``embeddings`` (B, L, D). Imports nothing of
``sd`` (which sets ``USE_TORCH=0`` for ppdiffusers, and diffusers reads the same variable).
"""

import sys

import numpy as np


def main(unet_folder: str, inputs_file: str, result_file: str) -> None:
    import diffusers
    import torch

    unet = diffusers.UNet2DConditionModel.from_pretrained(unet_folder)
    inputs = {k: torch.from_numpy(v) for k, v in np.load(inputs_file).items()}
    with torch.no_grad():
        out = unet(inputs["latents"], inputs["timesteps"], encoder_hidden_states=inputs["embeddings"]).sample
    np.save(result_file, out.numpy())


if __name__ == "__main__":
    main(*sys.argv[1:])
