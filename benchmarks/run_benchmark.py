"""``python -m sd.tools.benchmark`` as a script, for ``python -m paddle.distributed.launch`` (which runs a file,
not a module, so the repository reaches the ranks on PYTHONPATH), from the repository root:

    PYTHONPATH=. python -m paddle.distributed.launch --nproc_per_node 2 benchmarks/run_benchmark.py --kit reference \
        --batch_size 4
"""

from sd.tools.benchmark import main

if __name__ == "__main__":
    main()
