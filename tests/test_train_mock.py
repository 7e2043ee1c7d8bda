"""One training step end to end on tfds mock data (CIFAR-10 at 32x32, ImageNet at 224x224
with 1000 classes) through the tfds pipelines, the loop, checkpoints and evaluation. The
model is the small CNN, narrowed: the model zoo's own tests cover the big architectures,
whose compilation would dominate here."""

import json
import math

import pytest

from binax import train
from configs import common

tfds = pytest.importorskip("tensorflow_datasets")


@pytest.mark.slow
@pytest.mark.parametrize(
    "dataset, num_classes",
    [("cifar10", 10), ("imagenet2012", 1000)],
)
def test_one_step_on_mock_data(tmp_path, dataset, num_classes):
    c = common.base_config()
    c.model = common.model_config("cnn_small", num_classes=num_classes, width_multiplier=0.25)
    c.data.name = dataset
    c.num_epochs = 1
    c.batch_size = 4
    c.eval_batch_size = 4
    c.log_every_steps = 1
    with tfds.testing.mock_data(num_examples=4):
        summary = train.train_and_evaluate(c, str(tmp_path))
    assert summary["step"] == 1
    records = train.read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 1]  # the step's record, then the evaluation
    assert math.isfinite(records[0]["train/loss"]) and math.isfinite(records[1]["test/loss"])
    with open(tmp_path / "final.json") as f:
        assert json.load(f)["dataset"] == dataset
