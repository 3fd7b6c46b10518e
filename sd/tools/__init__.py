"""Tools around the training run: the benchmark, the side-by-side run against PaddleMIX's example,
latent precomputation, export to diffusers. Nothing in the training path imports them."""
