"""Two CPU ranks: rank 0 works alone for SD_TOY_SECONDS, then both all-reduce (tests/integration/test_distributed.py).

With SD_TOY_WAIT=1 the ranks meet in sd.runtime.distributed.after_rank_zero_work first; without it rank 1 waits
inside gloo's collective, which gives up after 30 s.

Started by ``paddle.distributed.launch`` with the repository on PYTHONPATH (``tests.helpers.common.env_with_root``;
by hand, from the repository root: ``PYTHONPATH=. python -m paddle.distributed.launch --nproc_per_node 2
tests/helpers/rank_zero_toy.py``)."""

import os
import time

import paddle
import paddle.distributed as dist

from sd.runtime.distributed import after_rank_zero_work

dist.init_parallel_env()
x = paddle.to_tensor([1.0 + dist.get_rank()])
dist.all_reduce(x)  # both ranks are up
if dist.get_rank() == 0:
    time.sleep(float(os.environ["SD_TOY_SECONDS"]))
if os.environ.get("SD_TOY_WAIT") == "1":
    after_rank_zero_work("toy")
dist.all_reduce(x)
print(f"rank {dist.get_rank()} done: {x.item():g}", flush=True)
