"""Real-data tests on CIFAR-10 (run when $EDLAB_DATA_DIR holds cifar-10-batches-py; scripts/test.sh prepares
the shared JPEG copy). Marked slow: CI runs them, `pytest` alone does not."""

import pytest
from conftest import cifar_dir

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(cifar_dir() is None, reason="no CIFAR-10 in $EDLAB_DATA_DIR")]


def test_cifar10_layout_and_split():
    from edlab.data import get_data

    d = get_data("cifar10", cifar_dir(), val_size=5000)
    assert (len(d.train.split), len(d.val.split), len(d.test.split)) == (45000, 5000, 10000)
    assert d.train.split.images.dtype.is_floating_point is False
    counts = d.test.split.labels.bincount(minlength=10)
    assert counts.tolist() == [1000] * 10  # the official test set is balanced


def test_resnet20_learns_on_cifar10(tmp_path):
    """One epoch on 8,000 images: far above chance (10 %) on the 10,000 test images (36.6 % on the JPEG copy,
    AVX512-BF16 host, 15 s; it trained two epochs before, 39 s, the CI's second-slowest test)."""
    from edlab.config import load_train_config
    from edlab.train import train

    cfg = load_train_config(None, None, [
        f"data.data_dir={cifar_dir()}", "data.train_subset=8000", "data.val_size=2000", "epochs=1",
        "model.name=resnet20", "optim.lr=0.1", f"out={tmp_path / 'run'}"])
    _, s = train(cfg)
    assert s["test_accuracy"] > 0.25, s["test_accuracy"]
    assert s["params"] == 272_474 and s["macs"] == 40_813_184
