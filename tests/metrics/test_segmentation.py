"""DSC and HD95 against brute-force computations (explicit surfaces, all pairwise distances)."""
import itertools

import numpy as np
import pytest

from nnunet_calibration.metrics import dice, hd95, image_diagonal


def brute_surface(mask):
    """Voxels of the mask with at least one face neighbour outside the mask or outside the image."""
    surf = np.zeros_like(mask)
    for idx in zip(*np.nonzero(mask)):
        for ax in range(mask.ndim):
            for step in (-1, 1):
                nb = list(idx)
                nb[ax] += step
                if not (0 <= nb[ax] < mask.shape[ax]) or not mask[tuple(nb)]:
                    surf[idx] = True
    return surf


def brute_hd95(pred, ref, spacing):
    sp = np.asarray(spacing, float)
    a = np.argwhere(brute_surface(pred)) * sp
    b = np.argwhere(brute_surface(ref)) * sp
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([d.min(1), d.min(0)]), 95))


def brute_dice(pred, ref):
    inter = sum(1 for i in itertools.product(*map(range, pred.shape)) if pred[i] and ref[i])
    return 2 * inter / (pred.sum() + ref.sum())


def random_blob(shape, seed, p=0.35):
    from scipy import ndimage
    rng = np.random.default_rng(seed)
    m = ndimage.binary_opening(rng.random(shape) < p) | (ndimage.gaussian_filter(rng.random(shape), 1.5) > 0.55)
    m[tuple(rng.integers(0, s) for s in shape)] = True  # never empty
    return m


@pytest.mark.parametrize("shape,spacing", [((9, 11, 8), (2.5, 0.7, 1.1)), ((19, 14), (0.5, 1.7)),
                                           ((6, 7, 5), (1.0, 1.0, 1.0))])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dice_and_hd95_match_brute_force(shape, spacing, seed):
    pred = random_blob(shape, seed)
    ref = random_blob(shape, seed + 100)
    assert pred.any() and ref.any()
    assert dice(pred, ref) == pytest.approx(brute_dice(pred, ref))
    assert hd95(pred, ref, spacing) == pytest.approx(brute_hd95(pred, ref, spacing), rel=1e-9)
    assert hd95(ref, pred, spacing) == pytest.approx(hd95(pred, ref, spacing), rel=1e-12)


def test_hd95_small_objects_far_apart_and_touching_border():
    pred = np.zeros((12, 10, 9), bool)
    ref = np.zeros_like(pred)
    pred[0:2, 0:3, 0:2] = True      # touches the image border
    ref[8:12, 6:10, 5:9] = True     # touches the other border
    sp = (3.0, 0.8, 1.3)
    assert hd95(pred, ref, sp) == pytest.approx(brute_hd95(pred, ref, sp), rel=1e-9)


def test_identical_masks():
    m = random_blob((8, 9, 10), 5)
    assert dice(m, m) == 1.0
    assert hd95(m, m, (1, 2, 3)) == 0.0


def test_empty_conventions_and_flag():
    shape, sp = (4, 5, 6), (2.0, 1.0, 0.5)
    empty = np.zeros(shape, bool)
    full = np.zeros(shape, bool)
    full[1, 2, 3] = True
    assert dice(empty, empty) == 1.0
    assert hd95(empty, empty, sp) == 0.0
    assert hd95(empty, empty, sp, return_flag=True) == (0.0, False)
    diag = np.sqrt((4 * 2.0) ** 2 + (5 * 1.0) ** 2 + (6 * 0.5) ** 2)
    assert image_diagonal(shape, sp) == pytest.approx(diag)
    for a, b in ((empty, full), (full, empty)):
        assert dice(a, b) == 0.0
        assert hd95(a, b, sp) == pytest.approx(diag)
        v, flag = hd95(a, b, sp, return_flag=True)
        assert flag is True and v == pytest.approx(diag)
    assert hd95(full, full, sp, return_flag=True) == (0.0, False)


def test_bad_arguments():
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((3, 3)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="spacing"):
        hd95(np.ones((3, 3)), np.ones((3, 3)), (1, 2, 3))


def medpy_convention_hd95(pred, ref, spacing, connectivity=1):
    """HD95 as medpy (``medpy.metric.binary.hd95``) computes it, written here with full-volume
    distance transforms: surface = mask XOR its erosion (border_value 0), distance of every surface
    voxel to the other surface by ``distance_transform_edt(~other_surface, sampling=spacing)``, 95th
    percentile of both directions pooled."""
    from scipy import ndimage

    st = ndimage.generate_binary_structure(pred.ndim, connectivity)
    sp_ = pred ^ ndimage.binary_erosion(pred, structure=st, border_value=0)
    sr_ = ref ^ ndimage.binary_erosion(ref, structure=st, border_value=0)
    d_pr = ndimage.distance_transform_edt(~sr_, sampling=spacing)[sp_]
    d_rp = ndimage.distance_transform_edt(~sp_, sampling=spacing)[sr_]
    return float(np.percentile(np.hstack([d_pr, d_rp]), 95))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("connectivity", [1, 3])
def test_hd95_equals_full_volume_medpy_convention(seed, connectivity):
    rng = np.random.default_rng(seed)
    shape = (18, 40, 37)
    spacing = (2.5, 0.7, 0.9)
    z, y, x = np.indices(shape)
    c = [rng.uniform(5, 13), rng.uniform(10, 30), rng.uniform(10, 27)]
    ref = ((z - c[0]) / 5) ** 2 + ((y - c[1]) / 9) ** 2 + ((x - c[2]) / 8) ** 2 < 1
    pred = ((z - c[0] - 1) / 5) ** 2 + ((y - c[1]) / 10) ** 2 + ((x - c[2] + 2) / 7) ** 2 < 1
    pred |= rng.random(shape) < 0.002  # scattered false positives far away (the bounding box is large)
    ref[0, :3, :3] = True  # an object on the image border
    assert hd95(pred, ref, spacing, connectivity=connectivity) == pytest.approx(
        medpy_convention_hd95(pred, ref, spacing, connectivity), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("shape,spacing", [((18, 40, 37), (2.5, 0.7, 0.9)), ((30, 28, 26), (1.0, 1.0, 1.0)),
                                           ((90, 70), (0.6, 1.4))])
def test_surface_distances_equal_full_volume_transform_point_by_point(shape, spacing):
    """Every directed surface distance (not only the percentile) equals the full-volume Euclidean
    distance transform of the other surface: near voxels found by the ball offsets, far ones (noise
    far from the other surface, beyond the ball) by the k-d tree."""
    from scipy import ndimage

    from nnunet_calibration.metrics import surface_distances

    rng = np.random.default_rng(len(shape))
    idx = np.indices(shape)
    c = np.array(shape) / 2
    ref = sum(((i - ci) / (0.3 * s)) ** 2 for i, ci, s in zip(idx, c, shape)) < 1
    pred = sum(((i - ci - 1) / (0.28 * s)) ** 2 for i, ci, s in zip(idx, c, shape)) < 1
    pred ^= rng.random(shape) < 0.01  # noisy surface and far-away false positives (and holes)
    st = ndimage.generate_binary_structure(len(shape), 1)
    sp_ = pred & ~ndimage.binary_erosion(pred, structure=st, border_value=0)
    sr_ = ref & ~ndimage.binary_erosion(ref, structure=st, border_value=0)
    d_pr, d_rp = surface_distances(pred, ref, spacing)
    full_pr = ndimage.distance_transform_edt(~sr_, sampling=spacing)[sp_]
    full_rp = ndimage.distance_transform_edt(~sp_, sampling=spacing)[sr_]
    near = 4 * min(spacing)
    assert (full_pr > near).sum() > 20 and (full_pr <= near).sum() > 20  # both stages are used
    np.testing.assert_allclose(d_pr, full_pr, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(d_rp, full_rp, rtol=1e-12, atol=1e-12)


def test_surface_by_shifts_equals_erosion():
    from scipy import ndimage

    from nnunet_calibration.metrics.segmentation import _surface

    rng = np.random.default_rng(0)
    for shape in [(7, 9, 8), (2, 9, 8), (1, 5, 6), (11, 12), (30,)]:
        m = rng.random(shape) < 0.6
        st = ndimage.generate_binary_structure(m.ndim, 1)
        np.testing.assert_array_equal(_surface(m), m & ~ndimage.binary_erosion(m, structure=st, border_value=0))
