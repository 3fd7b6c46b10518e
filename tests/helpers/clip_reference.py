"""transformers' side of the CLIP-score parity test (tests/integration/test_metrics.py), run without ``USE_TORCH=0``.

    python tests/helpers/clip_reference.py TOKENIZER_DIR IMAGES_DIR CAPTIONS_TXT OUT_DIR

Builds a tiny random ``transformers.CLIPModel`` (seed 0) with the tokenizer of TOKENIZER_DIR and a 32-px
``CLIPImageProcessor``, saves all three with transformers' ``save_pretrained`` into OUT_DIR/hf_clip
(safetensors), and scores the images of IMAGES_DIR (sorted) against the caption lines with transformers
itself: OUT_DIR/reference.npz holds each pair's cosine, the image features and exp(logit_scale).
"""

import os
import sys

import numpy as np
import torch
import transformers
from PIL import Image


def main(tok_dir, images_dir, captions_file, out_dir):
    tok = transformers.CLIPTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=4)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    model = transformers.CLIPModel(config).eval()
    processor = transformers.CLIPProcessor(
        transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tok)
    folder = os.path.join(out_dir, "hf_clip")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    captions = [line.strip() for line in open(captions_file, encoding="utf-8") if line.strip()]
    images = [Image.open(os.path.join(images_dir, n)).convert("RGB") for n in sorted(os.listdir(images_dir))]
    inputs = processor(text=captions, images=images, return_tensors="pt", padding="max_length", max_length=16,
                       truncation=True)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=inputs["pixel_values"]).double()
        txt = model.get_text_features(input_ids=inputs["input_ids"]).double()
        cos = torch.nn.functional.cosine_similarity(img, txt).numpy()
        scale = float(model.logit_scale.exp())
    np.savez(os.path.join(out_dir, "reference.npz"), cos=cos, image_features=img.numpy(), logit_scale=scale)


if __name__ == "__main__":
    main(*sys.argv[1:5])
