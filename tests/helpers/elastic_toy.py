"""A toy data-parallel job for the elastic tests: a step counter that survives restarts.

Every step all-reduces a tensor of ones over gloo (so a step needs every rank of the current world),
then rank 0 appends ``step world_size unix_time`` to ``<state_dir>/steps.log`` and saves the next step to
``<state_dir>/counter`` (written to a temporary file and renamed, so a kill leaves the old or the new
value, never half of one). A restarted job starts at the saved counter, whatever its world size.

    python tests/helpers/elastic_toy.py --state_dir DIR --steps 40 --step_seconds 0.25
"""

import argparse
import os
import time

import paddle
import paddle.distributed as dist


def read_counter(state_dir):
    """The next step to run: 0 without a counter file."""
    path = os.path.join(state_dir, "counter")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return int(f.read())


def write_counter(state_dir, step):
    """Atomically store ``step`` as the next step to run."""
    path = os.path.join(state_dir, "counter")
    with open(path + ".tmp", "w") as f:
        f.write(str(step))
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state_dir", required=True, help="folder shared by all ranks: counter, steps.log")
    parser.add_argument("--steps", type=int, default=40, help="total steps of the job")
    parser.add_argument("--step_seconds", type=float, default=0.25, help="sleep per step, seconds")
    args = parser.parse_args()

    paddle.set_device("cpu")
    world = int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))
    if world > 1:
        dist.init_parallel_env()
    rank = dist.get_rank() if world > 1 else 0
    start = read_counter(args.state_dir)
    print(f"rank {rank}/{world} starts at step {start}", flush=True)
    for step in range(start, args.steps):
        ones = paddle.ones([1], dtype="float32")
        if world > 1:
            dist.all_reduce(ones)
        assert int(ones.item()) == world, f"all_reduce gave {ones.item()}, expected {world}"
        time.sleep(args.step_seconds)
        if rank == 0:
            with open(os.path.join(args.state_dir, "steps.log"), "a") as f:
                f.write(f"{step} {world} {time.time():.3f}\n")
            write_counter(args.state_dir, step + 1)
    if world > 1:
        dist.barrier()
    print(f"rank {rank}/{world} done", flush=True)


if __name__ == "__main__":
    main()
