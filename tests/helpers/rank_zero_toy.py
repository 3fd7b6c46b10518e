"""Two CPU ranks: rank 0 works alone for SD_TOY_SECONDS, then both all-reduce (tests/integration/test_distributed.py).

With SD_TOY_WAIT=1 the ranks meet in sd.runtime.distributed.after_rank_zero_work first; without it rank 1 waits
inside gloo's collective, which gives up after 30 s."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import paddle  # noqa: E402
import paddle.distributed as dist  # noqa: E402

from sd.runtime.distributed import after_rank_zero_work  # noqa: E402

dist.init_parallel_env()
x = paddle.to_tensor([1.0 + dist.get_rank()])
dist.all_reduce(x)  # both ranks are up
if dist.get_rank() == 0:
    time.sleep(float(os.environ["SD_TOY_SECONDS"]))
if os.environ.get("SD_TOY_WAIT") == "1":
    after_rank_zero_work("toy")
dist.all_reduce(x)
print(f"rank {dist.get_rank()} done: {x.item():g}", flush=True)
