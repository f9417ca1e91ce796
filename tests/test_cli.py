"""The `mnist-flax` command line: one-line errors with exit status 2, a tfds-mock run, Ctrl-C."""

import dataclasses
import functools
import json
import signal
import subprocess
import sys
import time

import pytest
import tensorflow_datasets as tfds
from helpers import block_digits, command_environment, run_code, write_tfds_metadata

from mnist_flax import cli, config, input_pipeline

TINY = ["--image-size", "32", "--alpha", "0.35", "--weights", "none", "--batch-size", "8"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epochs", "0"], "error: --epochs must be at least 1, got 0"),
        (["--batch-size", "0"], "error: --batch-size must be at least 1, got 0"),
        (
            ["--image-size", "31"],
            "error: --image-size must be at least 32 (MobileNetV2's smallest input), got 31",
        ),
        (["--learning-rate", "0"], "error: --learning-rate must be a positive number, got 0.0"),
        (
            ["--learning-rate=-1e-3"],
            "error: --learning-rate must be a positive number, got -0.001",
        ),
        (["--learning-rate", "inf"], "error: --learning-rate must be a positive number, got inf"),
        (
            ["--image-size", "100000"],
            "error: --image-size 100000 with --batch-size 32: one batch needs about",
        ),
        (
            ["--model", "notebook", "--cache-features", "always"],
            "error: --cache-features always cannot be used with --model notebook: its adapter",
        ),
        (
            ["--model", "notebook", "--image-size", "96"],
            "error: --model notebook upsamples the 28x28 digits by a whole factor",
        ),
        (
            ["--fine-tune-epochs", "2", "--fine-tune-from", "block_99_expand"],
            "error: --fine-tune-from 'block_99_expand' is neither a block number 0..16 nor a layer",
        ),
        (
            ["--fine-tune-learning-rate", "nan"],
            "error: --fine-tune-learning-rate must be a positive number, got nan",
        ),
        (
            ["--epochs", "ten"],
            "error: argument --epochs: invalid int value: 'ten' (see mnist-flax train --help)",
        ),
    ],
)
def test_invalid_flags_give_one_error_line_and_status_2(flags, message, capsys, tmp_path):
    status = cli.main(["train", "--workdir", str(tmp_path / "run"), *flags])
    captured = capsys.readouterr()
    assert status == 2
    assert captured.err.startswith(message) and captured.err.count("\n") == 1, captured.err
    assert not (tmp_path / "run").exists()


def test_train_flags_are_the_config_fields_with_their_defaults_shown(capsys):
    args = cli.build_parser().parse_args(["train"])
    assert {name: getattr(args, name) for name in config.fields()} == dataclasses.asdict(
        config.TrainConfig()
    )
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for name, field in config.fields().items():
        flag = "--" + name.replace("_", "-")
        assert flag in shown
        if field.default is not None:
            assert f"(default: {field.default})" in shown, flag


def _fresh_python(code: str) -> str:
    """What `code` prints in a new interpreter, where nothing is imported yet."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout


def test_the_command_line_spares_the_exit_collection_and_python_callers_keep_theirs():
    """`mnist-flax` freezes what is alive as it ends (`runtime.freeze_for_exit`); `cli.main(argv)`
    called from Python leaves the collector alone."""
    code = (
        "import gc, sys\n"
        "from mnist_flax import cli\n"
        "assert cli.main(['train', '--epochs', '0']) == 2\n"
        "print(gc.get_freeze_count())\n"
        "sys.argv = ['mnist-flax', 'train', '--epochs', '0']\n"
        "assert cli.main() == 2\n"
        "print(gc.get_freeze_count())\n"
    )
    from_python, from_the_command_line = map(int, _fresh_python(code).split())
    assert from_python == 0 and from_the_command_line > 1000


def test_the_config_and_the_help_import_neither_jax_nor_tensorflow():
    """`mnist-flax train --help` answers before the heavy libraries load."""
    code = (
        "import sys\n"
        "from mnist_flax import cli\n"
        "try:\n"
        "    cli.main(['train', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in ('jax', 'tensorflow', 'flax') if m in sys.modules))"
    )
    assert _fresh_python(code).strip().splitlines()[-1] == "[]"


def test_the_training_code_loads_tensorflow_without_keras_and_keras_still_loads_after():
    """`runtime.import_tensorflow`: a run pays for tf.data, not for TensorFlow's Keras import."""
    code = (
        "import sys\n"
        "import mnist_flax.train\n"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)\n"
        "import keras, tensorflow as tf\n"
        "print(keras.layers.Dense is tf.keras.layers.Dense)"
    )
    assert _fresh_python(code).split() == ["True", "False", "True"]


def test_the_training_code_keeps_tensorflow_off_the_gpus():
    """`runtime.import_tensorflow` leaves TensorFlow every device but the GPUs (JAX's). TensorFlow's
    list of visible devices is empty until it is set, so an unset list (no call) shows here too."""
    code = (
        "import mnist_flax.train\n"
        "from tensorflow.python.eager import context\n"
        "print(sorted({d.device_type for d in context.context()._visible_device_list}))"
    )
    assert _fresh_python(code).strip().splitlines()[-1] == "['CPU']"


def test_the_command_line_loads_tensorflow_without_a_line_on_stderr():
    """The full build of TensorFlow 2.21 logs its CUDA stub's search for a driver as it loads,
    whatever `TF_CPP_MIN_LOG_LEVEL` says; the command's import of it (quieted as for a user) is
    silent, and stderr works again after it."""
    code = (
        "import sys\n"
        "from mnist_flax import runtime\n"
        "runtime.quiet_libraries()\n"
        "runtime.import_tensorflow()\n"
        "print('after', file=sys.stderr)"
    )
    result = run_code(code)
    assert (result.returncode, result.stderr) == (0, "after\n")


def test_a_muted_stderr_takes_what_cpp_and_python_write_and_lets_an_error_through():
    code = (
        "import os, sys\n"
        "from mnist_flax import runtime\n"
        "try:\n"
        "    with runtime._stderr_muted(True):\n"
        "        os.write(2, b'from C++\\n')\n"
        "        print('from Python', file=sys.stderr)\n"
        "        raise KeyError('inside')\n"
        "except KeyError as error:\n"
        "    print('caught', error, file=sys.stderr)\n"
        "with runtime._stderr_muted(False):\n"
        "    os.write(2, b'unmuted\\n')"
    )
    result = run_code(code, timeout=60)
    assert (result.returncode, result.stderr) == (0, "caught 'inside'\nunmuted\n")


def test_an_invalid_choice_names_the_flag(capsys):
    assert cli.main(["train", "--dtype", "float16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument --dtype: invalid choice: 'float16'")
    assert err.endswith("(see mnist-flax train --help)\n") and err.count("\n") == 1


def test_library_input_errors_are_one_line(capsys, tmp_path):
    status = cli.main(["train", "--data-dir", str(tmp_path / "missing"), *TINY])
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "missing" in err

    status = cli.main(["evaluate", "--workdir", str(tmp_path)])
    assert status == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path} holds no checkpoint")


def test_python_dash_m_prints_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mnist_flax", "train", "--batch-size", "0"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr == "error: --batch-size must be at least 1, got 0\n"


def test_train_on_tfds_mock_data_then_evaluate(tmp_path, monkeypatch, capsys):
    write_tfds_metadata(tmp_path / "tfds", "mnist", num_examples=24)
    # What TFDS_DATA_DIR does for a user (tfds reads that variable once, at import).
    monkeypatch.setattr(
        input_pipeline,
        "load_split",
        functools.partial(input_pipeline.load_split, tfds_data_dir=tmp_path / "tfds"),
    )
    workdir = tmp_path / "run"
    with tfds.testing.mock_data(num_examples=24, data_dir=tmp_path / "tfds"):
        status = cli.main(["train", *TINY, "--epochs", "1", "--quiet", "--workdir", str(workdir)])
        assert status == 0, capsys.readouterr().err
        assert "epoch 1/1" in capsys.readouterr().out
        assert cli.main(["evaluate", "--workdir", str(workdir)]) == 0
    assert "test accuracy" in capsys.readouterr().out
    for name in ("history.json", "curves.png", "confusion.png", "misclassified.png"):
        assert (workdir / name).is_file()


@pytest.mark.slow
def test_ctrl_c_stops_after_a_saved_epoch_and_the_next_run_resumes_quietly(tmp_path):
    """A real SIGINT to `python -m mnist_flax train`, then the same command again, then evaluate.

    The processes print only this project's lines: no TensorFlow, absl or Orbax chatter.
    """

    # Epochs of a few seconds each, so that the signal surely lands in the middle of the run.
    input_pipeline.write_idx_split(tmp_path / "idx", "train", *block_digits(3000, seed=0))
    input_pipeline.write_idx_split(tmp_path / "idx", "t10k", *block_digits(16, seed=1))
    command = [
        sys.executable, "-m", "mnist_flax", "train", *TINY, "--epochs", "3", "--quiet",
        "--data-dir", str(tmp_path / "idx"), "--workdir", str(tmp_path / "run"),
        # Epochs on images, long enough for the signal to arrive in the middle of the run.
        "--cache-features", "never",
    ]  # fmt: skip
    environment = command_environment()
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment
    )
    history = tmp_path / "run" / "history.json"
    deadline = time.monotonic() + 240
    while not history.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert history.exists(), process.communicate()
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert err == "interrupted\n"
    saved = len(json.loads(history.read_text())["epochs"])
    assert saved < 3
    assert f"interrupted during epoch {saved + 1}" in out and "run the same command again" in out

    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"resuming from the epoch-{saved} checkpoint")
    assert all(line.startswith("epoch ") for line in lines[1:]) and "epoch 3/3" in lines[-1]

    evaluate = [sys.executable, "-m", "mnist_flax", "evaluate", "--workdir", str(tmp_path / "run")]
    result = subprocess.run(evaluate, capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout.startswith("test accuracy")
