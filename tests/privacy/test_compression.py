import numpy as np
import pytest

from fedmed.privacy.compression import CompressionError, array_bytes, compress_float16, decompress_float16


def test_float16_halves_float32_bytes_and_leaves_int_buffers():
    rng = np.random.default_rng(0)
    update = {"w": rng.normal(size=(64, 32)).astype(np.float32), "bn.num_batches_tracked": np.array(7, dtype=np.int64)}
    compressed, dtypes = compress_float16(update)
    assert dtypes == {"w": "float32"}
    assert compressed["bn.num_batches_tracked"].dtype == np.int64
    assert array_bytes({"w": compressed["w"]}) * 2 == array_bytes({"w": update["w"]})
    restored = decompress_float16(compressed, dtypes)
    assert restored["w"].dtype == np.float32
    np.testing.assert_allclose(restored["w"], update["w"], rtol=1e-3, atol=1e-4)


def test_values_beyond_float16_range_raise():
    with pytest.raises(CompressionError, match="'big'"):
        compress_float16({"big": np.array([1e6], dtype=np.float32)})


def test_decompress_refuses_a_record_that_does_not_match():
    with pytest.raises(CompressionError, match="'w'"):
        decompress_float16({"w": np.zeros(3, dtype=np.float32)}, {"w": "float32"})
    with pytest.raises(CompressionError, match="missing"):
        decompress_float16({}, {"w": "float32"})
