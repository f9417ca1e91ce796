"""Throughput benchmark of the pipeline, the compiled train step and both together (optionally vs Keras).

The benchmark lives in `mnist_flax/benchmark.py` (so that notebooks can import it); this is its command
line, e.g.

    python scripts/benchmark.py --batch-size 32 128 --resize host device --keras-baseline --json bench.json

`python scripts/benchmark.py --help` lists every option.
"""

from mnist_flax import benchmark

if __name__ == "__main__":
    benchmark.main()
