"""Benchmarking, a wing of its own: `mnist-flax benchmark` times the input pipeline, the compiled
train step, the forward pass and both together, ours beside Keras 3 on TensorFlow and on JAX.

- `flags.py`: its command line (JAX-free, like `config.py`);
- `protocol.py`: how things are timed, the report, and Keras' backends each in a process of its own;
- `subjects.py`: what is timed, ours (`OurRun`) and Keras' (`KerasRun`).

The measurement and reference scripts (whole-process rounds, the Keras reference jobs, the
accelerator run) are in `scripts/`; every figure is in docs/benchmarks.md.
"""
