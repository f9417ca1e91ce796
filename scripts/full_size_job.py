"""The main job at full size, timed as a user runs it: 60,000 training and 10,000 test digits, 224 px,
10 epochs, default flags, one whole `mnist-flax train` process with nothing cached before it.

Offline machines have only MNIST's 10,000 test digits, so the training split is those digits repeated
six times (the same cost as MNIST's training set; the accuracy means nothing) and the test split is
them once: 70,000 digits through the backbone, as in the real job. Each run gets a new per-user cache
(no cached features, and by default no compiled steps either). Prints one line per run and writes
the rows to `--json`:

    python scripts/full_size_job.py --weights ../shared/weights/FILE.h5 \\
        --mnist-dir ../shared/data/mnist --runs 1 --json full_size.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import tempfile
import time

IMAGES = "t10k-images-idx3-ubyte"
LABELS = "t10k-labels-idx1-ubyte"
TRAIN_REPEATS = 6


def read_idx(path: pathlib.Path, header: int) -> tuple[bytes, bytes]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as file:
        data = file.read()
    return data[:header], data[header:]


def write_splits(mnist_dir: pathlib.Path, out: pathlib.Path) -> None:
    """train-*: the test digits repeated `TRAIN_REPEATS` times; t10k-*: the test digits."""
    for stem, header in ((IMAGES, 16), (LABELS, 8)):
        source = next(p for p in (mnist_dir / stem, mnist_dir / f"{stem}.gz") if p.exists())
        head, payload = read_idx(source, header)
        (out / stem).write_bytes(head + payload)
        count = int.from_bytes(head[4:8], "big") * TRAIN_REPEATS
        train_head = head[:4] + count.to_bytes(4, "big") + head[8:]
        (out / stem.replace("t10k", "train")).write_bytes(train_head + payload * TRAIN_REPEATS)


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help="Keras MobileNetV2 H5 weights (no top)")
    parser.add_argument("--mnist-dir", required=True, help="folder with t10k-*-ubyte[.gz]")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument(
        "--warm-compilation-cache",
        action="store_true",
        help="keep one compilation cache for every run (the features are always computed)",
    )
    parser.add_argument("--json", type=pathlib.Path, help="also write the rows here")
    parser.add_argument("train_flags", nargs="*", help="more `mnist-flax train` flags, after --")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="full_size_job_") as scratch:
        scratch = pathlib.Path(scratch)
        data = scratch / "data"
        data.mkdir()
        write_splits(pathlib.Path(args.mnist_dir), data)
        for run in range(args.runs):
            home = scratch / ("cache" if args.warm_compilation_cache else f"cache-{run}")
            features = home / "mnist_flax" / "features"
            if features.exists():
                for path in features.iterdir():
                    path.unlink()
            command = [
                *("mnist-flax", "train", "--weights", args.weights, "--data-dir", str(data)),
                *("--workdir", str(scratch / f"run-{run}"), "--quiet", *args.train_flags),
            ]
            began = time.perf_counter()
            subprocess.run(command, check=True, env={**os.environ, "XDG_CACHE_HOME": str(home)})
            seconds = time.perf_counter() - began
            # The largest resident set of the finished children: the runs are the only ones.
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
            history = json.loads((scratch / f"run-{run}" / "history.json").read_text())
            rows.append(
                {
                    "run": run,
                    "seconds": seconds,
                    "peak_rss_bytes": peak,
                    "epoch_seconds": [record["seconds"] for record in history["epochs"]],
                    "final_test_accuracy": history["epochs"][-1]["test_accuracy"],
                    "warm_compilation_cache": args.warm_compilation_cache,
                }
            )
            print(
                f"run {run}: {seconds:.1f} s whole process, peak RSS {peak / 2**30:.2f} GiB, "
                f"epochs {sum(rows[-1]['epoch_seconds']):.1f} s in all",
                flush=True,
            )
    result = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": sys.version.split()[0]},
        "command": " ".join(sys.argv),
        "rows": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
