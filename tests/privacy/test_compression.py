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


def _real_update():
    """A real weight difference: one epoch of the small CNN on synthetic X-rays."""
    from fedmed import data
    from fedmed.aggregation import weight_difference
    from fedmed.networks import build_network, state_to_numpy
    from fedmed.tasks import build_task
    from fedmed.training import LocalTrainer

    task = build_task({"name": "classification", "args": {}})
    site = data.synthetic_site_data(128, 32, seed=2)
    spec = {"name": "small_cnn", "args": {"width": 8}}
    start = state_to_numpy(build_network(spec, seed=0))
    trainer = LocalTrainer(task, task.to_dataset(site.train), task.to_dataset(site.val), lr=3e-3, device="cpu")
    return weight_difference(trainer.train(spec, start).weights, start)


def test_int8_sends_a_quarter_of_the_bytes_at_about_one_percent_error():
    from fedmed.privacy.compression import dequantize_int8, quantize_int8, relative_error

    update = _real_update()
    update["bn.num_batches_tracked"] = np.array(7, dtype=np.int64)
    quantized, record = quantize_int8(update)
    assert "bn.num_batches_tracked" not in record and quantized["bn.num_batches_tracked"].dtype == np.int64
    floats = [k for k in update if k in record]
    ratio = array_bytes({k: quantized[k] for k in floats}) / array_bytes({k: update[k] for k in floats})
    assert ratio == 0.25
    restored = dequantize_int8(quantized, record)
    assert all(restored[k].dtype == np.float32 for k in floats)
    for key in floats:  # every value within half a grid step
        assert np.max(np.abs(restored[key] - update[key])) <= record[key]["scale"] / 2 + 1e-7
    error = relative_error(update, restored)
    assert 0 < error < 0.02, error  # about 1 % on a real update
    assert relative_error(update, decompress_float16(*compress_float16(update))) < error  # fp16 is finer


def test_int8_refuses_bad_input_and_mismatched_records():
    from fedmed.privacy.compression import dequantize_int8, quantize_int8

    with pytest.raises(CompressionError, match="'w'"):
        quantize_int8({"w": np.array([1.0, np.nan], dtype=np.float32)})
    constant, record = quantize_int8({"w": np.full(4, 0.5, dtype=np.float32)})
    np.testing.assert_array_equal(dequantize_int8(constant, record)["w"], np.full(4, 0.5, dtype=np.float32))
    with pytest.raises(CompressionError, match="arrived as float32"):
        dequantize_int8({"w": np.zeros(4, np.float32)}, record)
    with pytest.raises(CompressionError, match="bad quantization record"):
        dequantize_int8(constant, {"w": {"dtype": "float32", "offset": 0.0, "scale": -1.0}})
