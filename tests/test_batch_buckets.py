"""Batch shapes of the ONNX Runtime CUDA path: every batch is padded to a bucket, and the buckets are
few (ORT re-prepares its convolutions whenever the batch shape changes)."""

import pytest

from worker.engines.onnxruntime import batch_buckets, bucket_for
from worker.errors import ConfigError
from worker.settings import Settings


def test_max_is_one_shape():
    assert batch_buckets(128, "max") == [128]
    assert all(bucket_for(n, [128]) == 128 for n in range(1, 129))


@pytest.mark.parametrize("max_batch, want", [(1, [1]), (2, [1, 2]), (128, [1, 2, 4, 8, 16, 32, 64, 128]),
                                             (100, [1, 2, 4, 8, 16, 32, 64, 100])])
def test_pow2_buckets_end_at_the_maximum(max_batch, want):
    assert batch_buckets(max_batch, "pow2") == want


def test_every_size_gets_the_smallest_bucket_that_holds_it():
    buckets = batch_buckets(100, "pow2")
    assert [bucket_for(n, buckets) for n in (1, 2, 3, 64, 65, 100)] == [1, 2, 4, 64, 100, 100]


def test_setting_defaults_to_one_shape_and_refuses_others():
    assert Settings().ort_batch_shapes == "max"
    with pytest.raises(ConfigError):
        Settings(ort_batch_shapes="any")
