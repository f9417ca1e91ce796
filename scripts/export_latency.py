"""CPU latency of exported classifiers (`mnist-flax export`), each run by its own runtime.

For every file given (a .keras, .tflite, .onnx or .stablehlo with its sidecar `<file>.json`, which
says the input shape) and every batch size: the time of one call on a batch already in memory,
median over `--repeats` rounds of `--calls` calls after a warm-up, the files interleaved round after
round so that a noisy neighbour slows them all alike. `--workdir` adds the JAX model the exports
came from (the run's classifier as `mnist-flax evaluate` restores it, jitted, `--conv-impl auto`).
The runtimes are given `--threads` threads where they take a number (LiteRT's interpreter, ONNX
Runtime's intra-op pool); TensorFlow (Keras) and XLA use every core.

    mnist-flax export --workdir RUN --format litert --out m.tflite   # and keras, onnx, stablehlo
    python scripts/export_latency.py m.keras m.tflite m-int8.tflite m.onnx m.stablehlo \\
        --workdir RUN --batch-sizes 1 32 --json latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time
from collections.abc import Callable

import numpy as np

# file -> (batch size -> a call on that batch that returns when the result is computed)
Prepared = Callable[[np.ndarray], Callable[[], object]]


def litert(path: pathlib.Path, threads: int) -> Prepared:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=threads)
    given, result = interpreter.get_input_details()[0], interpreter.get_output_details()[0]

    def prepare(images: np.ndarray):
        # Sized once per batch size: a deployment resizes when its batch changes, not per call.
        interpreter.resize_tensor_input(given["index"], images.shape)
        interpreter.allocate_tensors()

        def call():
            interpreter.set_tensor(given["index"], images)
            interpreter.invoke()
            return interpreter.get_tensor(result["index"])

        return call

    return prepare


def onnx(path: pathlib.Path, threads: int) -> Prepared:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda images: lambda: session.run(None, {name: images})


def keras_file(path: pathlib.Path, threads: int) -> Prepared:
    import keras

    model = keras.models.load_model(path, compile=False)
    # predict_on_batch: Keras' compiled predict function on one batch, without predict()'s loop.
    return lambda images: lambda: model.predict_on_batch(images)


def stablehlo(path: pathlib.Path, threads: int) -> Prepared:
    import jax

    exported = jax.export.deserialize(bytearray(path.read_bytes()))
    call = jax.jit(exported.call)
    return lambda images: lambda: jax.block_until_ready(call(images))


def jax_model(workdir: str) -> Prepared:
    import jax
    from flax import nnx

    from mnist_flax import evaluate

    model = evaluate.restore_run(workdir).model
    graphdef, state = nnx.split(model)
    predict = jax.jit(lambda state, x: jax.nn.softmax(nnx.merge(graphdef, state)(x)))
    return lambda images: lambda: jax.block_until_ready(predict(state, images))


LOADERS = {".tflite": litert, ".onnx": onnx, ".keras": keras_file, ".stablehlo": stablehlo}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("files", nargs="+", type=pathlib.Path, help="exported files")
    parser.add_argument("--workdir", help="also time the run's JAX model")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--calls", type=int, default=20, help="timed calls a round")
    parser.add_argument("--repeats", type=int, default=5, help="rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="LiteRT, ONNX Runtime")
    parser.add_argument("--json", type=pathlib.Path, help="also write the results to this file")
    args = parser.parse_args()

    from mnist_flax import runtime

    runtime.quiet_libraries()
    shapes, subjects = set(), {}
    for path in args.files:
        sidecar = json.loads(path.with_name(path.name + ".json").read_text())
        shapes.add(tuple(sidecar["input"]["shape"][1:]))
        quantized = " int8" if sidecar["quantization"] else ""
        subjects[f"{sidecar['format']}{quantized} {path.name}"] = (
            LOADERS[path.suffix](path, args.threads),
            path.stat().st_size,
        )
    if len(shapes) != 1:
        raise SystemExit(f"the files take different inputs ({sorted(shapes)}): one model at a time")
    if args.workdir:
        subjects["jax (the run's model, jitted)"] = (jax_model(args.workdir), None)
    (shape,) = shapes
    rng = np.random.default_rng(0)
    results = []
    for batch_size in args.batch_sizes:
        images = rng.uniform(-1.0, 1.0, (batch_size, *shape)).astype(np.float32)
        if shape[-1] == 1:
            images = (images + 1.0) / 2.0  # the notebook model's digits are in [0, 1]
        calls = {name: prepare(images) for name, (prepare, _) in subjects.items()}
        for call in calls.values():
            for _ in range(args.warmup):
                call()
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.repeats):
            for name, call in calls.items():
                start = time.perf_counter()
                for _ in range(args.calls):
                    call()
                times[name].append((time.perf_counter() - start) / args.calls)
        for name, per_call in times.items():
            median = statistics.median(per_call)
            results.append(
                {
                    "subject": name,
                    "bytes": subjects[name][1],
                    "batch_size": batch_size,
                    "median_ms": 1e3 * median,
                    "min_ms": 1e3 * min(per_call),
                    "images_per_s": batch_size / median,
                }
            )
    print(f"{'subject':<44} {'MB':>6} {'batch':>5} {'median ms':>10} {'min ms':>8} {'img/s':>8}")
    for row in results:
        size = "" if row["bytes"] is None else f"{row['bytes'] / 1e6:.1f}"
        print(
            f"{row['subject']:<44} {size:>6} {row['batch_size']:>5} {row['median_ms']:>10.2f} "
            f"{row['min_ms']:>8.2f} {row['images_per_s']:>8.0f}"
        )
    if args.json:
        settings = {**vars(args), "files": [str(f) for f in args.files], "json": str(args.json)}
        args.json.write_text(json.dumps({"args": settings, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
