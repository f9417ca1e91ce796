"""Every function training and evaluation compile, lowered for TPU and GPU on this CPU-only machine.

No TPU or GPU has ever run this code; what runs there is the XLA path (`conv_impl` "xla",
`resize` "device", often bfloat16). JAX lowers for a platform it has no device for:
`jax.export.export(jitted, platforms=(platform,))` traces the function and emits the StableHLO that
platform's compiler would receive, with that platform's lowering rules, and refuses what cannot
travel (a host callback, a custom call outside its stable list, an op with no lowering there). So
each case builds a real `StepRunner` with what "auto" picks on that platform and lowers the
runner's own jitted functions (`compiled_functions`, the one place this file reaches into the
runner), for "tpu" and "cuda". What it cannot show: XLA's TPU/GPU compilers themselves, the
device's memory, speed and numerics (issue 32's device run).

The cases are pairwise over model x dtype x resize x stage (`CASES`), each lowered for both
platforms. The CPU path's kernels (`cpu_ops.py`) and its chunking by cache size (`cpu_chunks.py`,
which reads the CPU's L2 size from sysfs) are CPU-only on purpose; `cpu_only_calls` records every call to them
while the accelerator path traces, and each case asserts there were none.
"""

import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import BATCH, IMAGE_SIZE, NOTEBOOK_IMAGE_SIZE, tiny_model

from mnist_flax import cpu_chunks, cpu_ops, input_pipeline, parallel
from mnist_flax.config import DIGIT_SIZE, FINE_TUNE_STAGE, FROZEN_STAGE
from mnist_flax.convolutions import resolve_conv_impl
from mnist_flax.freezing import make_optimizer
from mnist_flax.model import resolve_resize
from mnist_flax.steps import StepRunner, make_metrics

PLATFORMS = ("tpu", "cuda")
TESTS_DIR = os.path.dirname(__file__)
NUM_EXAMPLES = 20  # a cached split that leaves the last batch padded


@dataclasses.dataclass(frozen=True)
class Case:
    model: str  # "pipeline" | "notebook"
    dtype: str  # "float32" | "bfloat16"
    resize: str  # "auto" (-> "device" off the CPU; "none" for the notebook model) | "host"
    stage: str  # FROZEN_STAGE: no fine_tune_from | FINE_TUNE_STAGE: fine_tune_from="13"

    @property
    def id(self) -> str:
        return f"{self.model}-{self.dtype}-resize_{self.resize}-{self.stage}"


# Every pair of values of model, dtype, stage and (pipeline) resize appears in some case.
CASES = [
    Case("pipeline", "float32", "host", FROZEN_STAGE),
    Case("pipeline", "bfloat16", "auto", FINE_TUNE_STAGE),
    Case("pipeline", "float32", "auto", FROZEN_STAGE),
    Case("pipeline", "bfloat16", "host", FINE_TUNE_STAGE),
    Case("notebook", "float32", "auto", FINE_TUNE_STAGE),
    Case("notebook", "bfloat16", "auto", FROZEN_STAGE),
]


def compiled_functions(runner: StepRunner, batch, images, examples, indices) -> dict:
    """Name -> (the runner's jitted function, the arguments its public method passes it).

    The one place this file reaches into `StepRunner`: the jitted functions of its `__init__`.
    """
    model, optimizer, metrics = runner.model_state, runner.optimizer_state, runner.metrics_state
    return {
        "train": (runner._train, (model, optimizer, metrics, batch)),
        "eval": (runner._eval, (model, metrics, batch)),
        "train_block": (runner._train_block, (model, optimizer, metrics, examples, indices)),
        "eval_block": (runner._eval_block, (model, metrics, examples, indices)),
        # The forward pass to what each stage caches (`stop`, a static argument).
        "features": (runner._forward, (model, images, "features")),
        "cut_activations": (runner._forward, (model, images, "activations")),
        "predict": (runner._predict, (model, images)),
        "reset_metrics": (runner._reset, (metrics,)),
        "read_metrics": (runner._compute, (metrics,)),
    }


def functions_of(case: Case) -> list[str]:
    """What a run of `case` compiles: the notebook model's adapter trains in front of the backbone,
    so it never caches anything (`feature_cache.stage_inputs`); the pipeline model's frozen
    stage caches pooled features, its fine-tuning stage the cut activations (and the frozen stage
    before it computes features through the cut)."""
    names = ["train", "eval", "predict", "reset_metrics", "read_metrics"]
    if case.model == "pipeline":
        names += ["train_block", "eval_block", "features"]
        if case.stage == FINE_TUNE_STAGE:
            names.append("cut_activations")
    return names


def image_spec(case: Case, resize: str) -> jax.ShapeDtypeStruct:
    """A batch of images as the input pipeline hands it to the step (`input_pipeline.make_batches`)."""
    if resize == "host":
        return jax.ShapeDtypeStruct((BATCH, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
    # "device": uint8 digits, resized in the step; "none": the notebook model's digits in [0, 1].
    dtype = jnp.uint8 if resize == "device" else jnp.float32
    return jax.ShapeDtypeStruct((BATCH, DIGIT_SIZE, DIGIT_SIZE, 1), dtype)


def build(case: Case, platform: str, mesh=None) -> tuple[StepRunner, dict]:
    """The runner a run of `case` builds on `platform` (conv_impl "auto", resize `case.resize`),
    on `mesh` (default: one device), and its compiled functions with their arguments (batches
    split over the mesh)."""
    resize = resolve_resize(case.resize, case.model, platform=platform)
    fine_tune = case.stage == FINE_TUNE_STAGE
    model = tiny_model(
        dtype=case.dtype,
        conv_impl=resolve_conv_impl("auto", platform=platform),
        model=case.model,
        fine_tune_from="13" if fine_tune else None,
    )
    assert model.image_size == (NOTEBOOK_IMAGE_SIZE if case.model == "notebook" else IMAGE_SIZE)
    optimizer = make_optimizer(model, 1e-3, stage=case.stage)
    runner = StepRunner(model, optimizer, make_metrics(), stage=case.stage, mesh=mesh)
    rows = parallel.batch_sharding(runner.mesh)
    images = image_spec(case, resize)
    images = jax.ShapeDtypeStruct(images.shape, images.dtype, sharding=rows)
    batch = {
        "image": images,
        "label": jax.ShapeDtypeStruct((BATCH,), jnp.int32, sharding=rows),
        "mask": jax.ShapeDtypeStruct((BATCH,), jnp.bool_, sharding=rows),
    }
    examples = None
    if case.model == "pipeline":
        # The split on cached values, as `feature_cache` keeps it: float32 values of the shape the
        # frozen layers compute, and int32 labels, replicated on the mesh.
        name = "activations" if fine_tune else "features"
        shape = jax.eval_shape(lambda x: runner.forward(x, name), images).shape[1:]
        examples = runner.place_examples(
            {
                name: np.zeros((NUM_EXAMPLES, *shape), np.float32),
                "label": np.zeros((NUM_EXAMPLES,), np.int32),
            }
        )
    indices = input_pipeline.batch_indices(NUM_EXAMPLES, BATCH, shuffle_seed=0)
    return runner, compiled_functions(runner, batch, images, examples, indices)


# The CPU path's own code, CPU-only on purpose: convolutions in the forms XLA:CPU runs fast, the
# batch in chunks sized to the CPU's L2 cache (read from sysfs). "auto" picks XLA's convolutions
# and whole batches on any other platform, so tracing for one must never reach these.
CPU_ONLY = ("taps_conv", "im2col_conv", "images_per_chunk", "max_chunk", "l2_cache_bytes")


@pytest.fixture
def cpu_only_calls(monkeypatch) -> list[str]:
    """Records every call of `CPU_ONLY` and every chunked `map_in_chunks` (chunk > 0) made while
    the test traces, wherever a module of the package holds them."""
    calls: list[str] = []

    def always(*args, **kwargs):
        return True

    def chunked(fn, x, chunk):
        return chunk > 0

    def recording(name, function, counts):
        def wrapper(*args, **kwargs):
            if counts(*args, **kwargs):
                calls.append(name)
            return function(*args, **kwargs)

        return wrapper

    originals = {
        name: getattr(cpu_ops if hasattr(cpu_ops, name) else cpu_chunks, name)
        for name in (*CPU_ONLY, "map_in_chunks")
    }
    wrappers = {
        id(function): recording(name, function, chunked if name == "map_in_chunks" else always)
        for name, function in originals.items()
    }
    for module_name, module in list(sys.modules.items()):
        if module_name.split(".")[0] == "mnist_flax":
            for attribute, value in list(vars(module).items()):
                if id(value) in wrappers:
                    monkeypatch.setattr(module, attribute, wrappers[id(value)])
    return calls


def convolution_kernels(model) -> int:
    """The model's convolutions: one 4-D kernel each (the head's kernel is 2-D)."""
    return sum(
        variable[...].ndim == 4 for _, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))
    )


def export_all(case: Case, platform: str) -> tuple[StepRunner, dict[str, str], list[str]]:
    """Each of the case's functions lowered for `platform`: its StableHLO text, and the failures
    (function, platform and options named)."""
    runner, functions = build(case, platform)
    texts, failures = {}, []
    for name in functions_of(case):
        function, args = functions[name]
        try:
            exported = jax.export.export(function, platforms=(platform,))(*args)
        except Exception as error:  # every failure is reported, with what failed
            message = f"{type(error).__name__}: {error}"[:2000]
            failures.append(f"{name} for {platform} ({case.id}): {message}")
            continue
        assert exported.platforms == (platform,)
        texts[name] = exported.mlir_module()
    return runner, texts, failures


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_every_compiled_function_lowers_for_tpu_and_gpu(case, cpu_only_calls):
    for platform in PLATFORMS:
        runner, texts, failures = export_all(case, platform)
        assert not failures, "\n".join(failures)
        assert not cpu_only_calls, f"{platform} ({case.id}) traced the CPU path: {cpu_only_calls}"
        # Every convolution is XLA's, the whole batch at once (the CPU forms have none, and
        # chunks would be a loop).
        convolutions = texts["predict"].count("stablehlo.convolution")
        assert convolutions == convolution_kernels(runner.model), (platform, case.id)
        assert "stablehlo.while" not in texts["predict"], (platform, case.id)
        # The train step still hands its states' buffers to its outputs.
        assert re.search(r"tf\.aliasing_output|jax\.buffer_donor", texts["train"]), (
            platform,
            case.id,
        )


def test_the_cases_cover_every_pair_of_option_values():
    """Each two options take every pair of their values in some case; resize varies for the
    pipeline model only (the notebook model's digits are never resized outside the step)."""
    values = {
        "model": ("pipeline", "notebook"),
        "dtype": ("float32", "bfloat16"),
        "stage": (FROZEN_STAGE, FINE_TUNE_STAGE),
    }
    pairs = [(a, b, CASES) for a, b in itertools.combinations(values, 2)]
    pipeline = [case for case in CASES if case.model == "pipeline"]
    pairs += [(a, "resize", pipeline) for a in ("dtype", "stage")]
    values["resize"] = ("auto", "host")
    for a, b, cases in pairs:
        seen = {(getattr(case, a), getattr(case, b)) for case in cases}
        missing = set(itertools.product(values[a], values[b])) - seen
        assert not missing, (a, b, missing)


def test_auto_picks_the_xla_path_off_the_cpu():
    for platform in PLATFORMS:
        assert resolve_conv_impl("auto", platform=platform) == "xla"
        assert resolve_resize("auto", "pipeline", platform=platform) == "device"
        assert resolve_resize("host", "pipeline", platform=platform) == "host"
        assert resolve_resize("auto", "notebook", platform=platform) == "none"
    assert resolve_conv_impl("auto", platform="cpu") == "cpu"
    assert resolve_resize("auto", "pipeline", platform="cpu") == "host"


def test_the_cpu_path_is_what_the_recorder_and_the_count_would_catch(cpu_only_calls):
    """The control: what "auto" traces on the CPU reaches every CPU-only form, and computes no
    convolution with XLA's, so the checks above can fail."""
    case = Case("notebook", "float32", "auto", FROZEN_STAGE)
    _, texts, failures = export_all(case, "cpu")
    assert not failures, "\n".join(failures)
    assert set(cpu_only_calls) >= {"taps_conv", "im2col_conv", "images_per_chunk", "map_in_chunks"}
    assert "stablehlo.convolution" not in texts["predict"]


# Runs in a process with 8 CPU devices (JAX fixes its device count when the backend starts).
EIGHT_DEVICE_EXPORT = """
import json, sys
import jax
sys.path.insert(0, sys.argv[1])
from test_lowering import CASES, build
from mnist_flax import parallel

assert len(jax.devices()) == 8, jax.devices()
mesh = parallel.data_mesh()
results = {}
for case in (CASES[1], CASES[2]):  # bfloat16 fine-tuning, float32 frozen: resize auto ("device")
    runner, functions = build(case, "tpu", mesh=mesh)
    for name in ("train", "eval", "train_block"):
        function, args = functions[name]
        exported = jax.export.export(function, platforms=("tpu",))(*args)
        ins, _ = jax.tree.unflatten(exported.in_tree, exported.in_shardings_jax(mesh))
        outs = jax.tree.unflatten(exported.out_tree, exported.out_shardings_jax(mesh))
        split = lambda s: sorted({tuple(leaf.spec) for leaf in jax.tree.leaves(s)})
        replicated = lambda s: all(leaf.is_fully_replicated for leaf in jax.tree.leaves(s))
        results[f"{name} ({case.id})"] = {
            "platforms": list(exported.platforms),
            "devices": exported.nr_devices,
            "states_replicated": replicated(ins[:2 if name.startswith("eval") else 3]),
            "batch_specs": split(ins[-1]) if name in ("train", "eval") else None,
            "outputs_replicated": replicated(outs if name != "eval" else outs[0]),
            "predictions_specs": split(outs[1]) if name == "eval" else None,
        }
print(json.dumps(results))
"""


@pytest.mark.slow
def test_the_data_parallel_steps_lower_for_an_eight_chip_tpu():
    """The runner's steps on an 8-device mesh, lowered for "tpu": batch rows split 8 ways, state
    replicated, in the StableHLO an 8-chip host would compile (XLA's partitioner then inserts the
    gradient all-reduce). An `AbstractMesh` has no devices, and the runner places its states on
    its mesh's devices when it is built, so the mesh is 8 fake CPU devices (`test_parallel.py`'s);
    what is exported keeps only the mesh's shape."""
    result = subprocess.run(
        [sys.executable, "-c", EIGHT_DEVICE_EXPORT, TESTS_DIR],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(results) == 6
    for name, found in results.items():
        assert found["platforms"] == ["tpu"] and found["devices"] == 8, (name, found)
        assert found["states_replicated"] and found["outputs_replicated"], (name, found)
        if found["batch_specs"] is not None:
            assert found["batch_specs"] == [["data"]], (name, found)
        if found["predictions_specs"] is not None:
            assert found["predictions_specs"] == [["data"]], (name, found)
