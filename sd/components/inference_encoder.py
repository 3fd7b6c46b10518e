"""A frozen layer run by Paddle Inference instead of eager dygraph (``--frozen_inference``).

The frozen VAE encoder is the largest share of a faithful training step on a CPU (≈ 47 % at the
PaddleMIX example's config), and dygraph runs its convolutions as im2col + GEMM, one operator at a
time, at ≈ 10 GFLOP/s on one AVX2 core. Exported once to a static program and run by a
``paddle.inference`` predictor with oneDNN, the same arithmetic runs with fused convolution + bias
(+ activation) kernels, ≈ 2.8× faster at that config (CPU time, the same process, interleaved); the frozen
text encoder gains ≈ 2× the same way. The weights are copied into the predictor when it is built: this is
only right for a layer that never changes (frozen).

Numbers: the oneDNN kernels sum in another order, so the output differs from the eager one by float
rounding (≈ 1e-6 relative on the posterior and on the text hidden states); a run with it is not
bit-identical to one without it.
"""

from __future__ import annotations

import os
import tempfile
from typing import Dict, Tuple

import numpy as np
import paddle
from paddle import nn


class InferenceFunction:
    """``layer(x)`` of a frozen layer, run by a Paddle Inference predictor (one per input shape and dtype).

    Args:
        layer: a layer whose ``forward`` takes one tensor (batch first) and returns one tensor.
            It is exported with its classes' own ``forward`` methods: instance-level replacements (such as
            ``sd.model.use_dense_conv_bias``, an eager-only speed-up) are left out of the export, so the
            graph passes can fuse each convolution with its bias.
        onednn: use oneDNN kernels (CPU); False keeps Paddle's plain CPU kernels with the graph passes.
        threads: CPU math threads of the predictor (1 = what eager training uses).
    """

    def __init__(self, layer: nn.Layer, onednn: bool = True, threads: int = 1):
        self.layer, self.onednn, self.threads = layer, onednn, threads
        self._predictors: Dict[Tuple[int, ...], tuple] = {}

    def _build(self, shape: Tuple[int, ...], dtype):
        from paddle import inference

        overridden = {id(sub): (sub, sub.__dict__.pop("forward")) for sub in self.layer.sublayers(include_self=True)
                      if "forward" in sub.__dict__}
        try:
            with tempfile.TemporaryDirectory(prefix="sd-inference-") as folder:
                prefix = os.path.join(folder, "model")
                spec = [paddle.static.InputSpec([None, *shape[1:]], dtype, name="x")]
                paddle.jit.save(paddle.jit.to_static(self.layer, input_spec=spec, full_graph=True), prefix)
                program = prefix + (".json" if os.path.isfile(prefix + ".json") else ".pdmodel")
                config = inference.Config(program, prefix + ".pdiparams")
                config.disable_gpu()
                config.set_cpu_math_library_num_threads(self.threads)
                if self.onednn:
                    config.enable_mkldnn()
                config.disable_glog_info()
                predictor = inference.create_predictor(config)  # reads the files now; the folder may go
        finally:
            for sub, forward in overridden.values():
                sub.forward = forward
        return (predictor, predictor.get_input_handle(predictor.get_input_names()[0]),
                predictor.get_output_handle(predictor.get_output_names()[0]))

    def __call__(self, x: paddle.Tensor) -> paddle.Tensor:
        key = (tuple(x.shape[1:]), str(x.dtype))
        if key not in self._predictors:
            self._predictors[key] = self._build(tuple(x.shape), x.dtype)
        predictor, inp, out = self._predictors[key]
        array = np.ascontiguousarray(x.numpy())
        inp.reshape(array.shape)
        inp.copy_from_cpu(array)
        predictor.run()
        return paddle.to_tensor(out.copy_to_cpu())
