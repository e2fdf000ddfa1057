"""The external hospital with an acquisition gap (issue 17, item 5): fedmed.data.acquisition_hospital."""

import numpy as np
import pytest

from fedmed import data

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def pool():
    return data.synthetic_site_data(300, 120, image_size=28, seed=4)


def _exposure_curve_residual(source: np.ndarray, target: np.ndarray) -> float:
    """RMS error of the best cubic pixel-wise curve from ``source`` to ``target``: ~0 when ``target``
    is ``source`` through any exposure curve (gamma, contrast, brightness: what a site's profile is)."""
    x, y = source.reshape(-1).astype(np.float64), target.reshape(-1).astype(np.float64)
    fit = np.polyval(np.polyfit(x, y, 3), x)
    return float(np.sqrt(np.mean((fit - y) ** 2)))


def test_the_proxy_is_deterministic_and_seeded(pool):
    a = data.acquisition_hospital(pool.val, seed=0)
    b = data.acquisition_hospital(pool.val, seed=0)
    c = data.acquisition_hospital(pool.val, seed=1)
    assert a.images.tobytes() == b.images.tobytes()
    assert not np.allclose(a.images, c.images)
    assert a.images.dtype == np.float32 and a.images.shape == pool.val.images.shape
    assert 0.0 <= a.images.min() and a.images.max() <= 1.0


def test_the_proxy_keeps_every_label_and_leaves_its_source_untouched(pool):
    before = pool.val.images.copy()
    proxy = data.acquisition_hospital(pool.val, seed=0)
    np.testing.assert_array_equal(proxy.labels, pool.val.labels)
    np.testing.assert_array_equal(pool.val.images, before)
    assert proxy.labels is not pool.val.labels


def test_no_sites_exposure_curve_reaches_the_proxy(pool):
    """Sites differ from the pool only by an exposure curve; the proxy also differs in resolution,
    positioning and noise, which no curve can produce."""
    proxy = data.acquisition_hospital(pool.val, seed=0).images
    for index in [0, 1, 2, 3, 4, 19, data.EXTERNAL_PROFILE_BASE]:
        site_like = data.scanner_shift(pool.val.images, index, 0)
        assert _exposure_curve_residual(pool.val.images, site_like) < 0.01, index
    assert _exposure_curve_residual(pool.val.images, proxy) > 0.05
    # and its exposure curve itself lies outside every site's: contrast 0.8-1.2 and gamma exp(+-0.25) at most
    profile = data.AcquisitionProfile()
    assert profile.contrast < 0.8 and profile.gamma > np.exp(0.25) and profile.resolution < 1.0


def test_the_proxy_has_less_fine_detail_than_its_source():
    """Lower detector resolution: without noise, the high-frequency energy drops."""
    images = data.synthetic_xrays(64, 28, seed=9, noise=0.0).images
    quiet = data.AcquisitionProfile(noise_std=0.0)
    proxy = data.acquisition_shift(images, 0, quiet)

    def detail(x):
        return float(np.mean(np.abs(np.diff(x, axis=-1))) + np.mean(np.abs(np.diff(x, axis=-2))))

    assert detail(proxy) < 0.8 * detail(images)


def test_partition_sites_adds_the_proxy_beside_external_val(pool):
    fed = data.partition_sites(pool, 3, seed=0)
    proxy = fed.external[data.ACQUISITION_EXTERNAL]
    np.testing.assert_array_equal(proxy.labels, pool.val.labels)
    np.testing.assert_array_equal(proxy.images, data.acquisition_hospital(pool.val, 0).images)
    assert not np.allclose(proxy.images, fed.external["external-val"].images)
    assert fed.provenance["external"][data.ACQUISITION_EXTERNAL] == "val"


def test_images_of_the_wrong_shape_are_refused_by_name():
    with pytest.raises(data.DataError, match=r"acquisition_shift: expected images shaped \(N, C, H, W\)"):
        data.acquisition_shift(np.zeros((4, 28, 28), dtype=np.float32))
