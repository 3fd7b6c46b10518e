"""``python -m sd.tools.benchmark`` as a script, for ``python -m paddle.distributed.launch`` (which runs a file):

    python -m paddle.distributed.launch --nproc_per_node 2 benchmarks/run_benchmark.py --kit reference --batch_size 4
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sd.tools.benchmark import main  # noqa: E402

if __name__ == "__main__":
    main()
