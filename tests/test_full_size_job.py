"""scripts/full_size_job.py builds its 70,000-digit splits from the 10,000 test digits correctly."""

import importlib.util
import pathlib

import numpy as np
from helpers import block_digits

from mnist_flax import input_pipeline

SCRIPT = pathlib.Path(__file__).parents[1] / "scripts" / "full_size_job.py"


def test_the_training_split_is_the_test_digits_repeated(tmp_path):
    spec = importlib.util.spec_from_file_location("full_size_job", SCRIPT)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    images, labels = block_digits(12, seed=0)
    input_pipeline.write_idx_split(tmp_path / "mnist", "t10k", images, labels, gz=True)
    (tmp_path / "out").mkdir()
    job.write_splits(tmp_path / "mnist", tmp_path / "out")

    def read(split):
        split = input_pipeline.load_split("mnist", split, data_dir=tmp_path / "out")
        batch = next(split.examples.batch(1000).as_numpy_iterator())
        return batch["image"][..., 0], batch["label"]

    train_images, train_labels = read("train")
    test_images, test_labels = read("test")
    assert len(train_labels) == job.TRAIN_REPEATS * 12
    np.testing.assert_array_equal(test_images, images)
    np.testing.assert_array_equal(test_labels, labels)
    np.testing.assert_array_equal(train_images, np.tile(images, (job.TRAIN_REPEATS, 1, 1)))
    np.testing.assert_array_equal(train_labels, np.tile(labels, job.TRAIN_REPEATS))
