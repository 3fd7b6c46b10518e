"""Generating and judging images: the sampler, the shapes benchmark, the COCO protocol (FID and CLIP score),
their metrics, and the same scores during training."""
