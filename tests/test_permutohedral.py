import numpy as np
import pytest
import skimage.data as skdata  # the dev extra installs it
import skimage.transform as sktransform
import torch
import torch.nn.functional as F

from deeplab.config import CrfConfig
from deeplab.crf import dense_crf
from deeplab.permutohedral import (
    apply_chain,
    build_lattice,
    crf_features,
    crf_operators,
    dense_crf_torch,
    elevate,
    lattice_operators,
    mean_field,
    simplex,
)
from tests.conftest import torch_threads


@pytest.fixture(autouse=True)
def one_thread():
    # Many small ops: on a busy 2-core machine an OpenMP team waiting on a descheduled thread is far slower.
    with torch_threads(1):
        yield


def photo(name: str, size: tuple[int, int]) -> np.ndarray:
    img = sktransform.resize(getattr(skdata, name)(), size, anti_aliasing=True)
    return np.ascontiguousarray((img * 255).round().astype(np.uint8))


def net_like_probs(rgb: np.ndarray, n_classes: int, seed: int = 0) -> np.ndarray:
    """(C, H, W) softmax like a segmentation net's: smooth random logits at stride 8 plus a bonus for one class
    per k-means colour cluster, upsampled bilinearly, so object boundaries are blurry and the CRF has work."""
    rng = np.random.default_rng(seed)
    h, w = rgb.shape[:2]
    small = ((h + 7) // 8, (w + 7) // 8)
    noise = torch.from_numpy(rng.normal(size=(1, n_classes, *small)).astype(np.float32))
    logits = F.avg_pool2d(F.pad(noise, (1, 1, 1, 1), mode="replicate"), 3, 1)[0] * 3
    px = rgb.reshape(-1, 3).astype(np.float32)
    centres = px[rng.choice(len(px), 6, replace=False)]
    for _ in range(5):
        cluster = ((px[:, None] - centres[None]) ** 2).sum(2).argmin(1)
        centres = np.stack([px[cluster == k].mean(0) if (cluster == k).any() else centres[k] for k in range(6)])
    cls = rng.choice(n_classes, 6, replace=n_classes < 6)[cluster].reshape(h, w)
    onehot = torch.from_numpy((cls[None] == np.arange(n_classes)[:, None, None]).astype(np.float32))
    logits += 4 * F.adaptive_avg_pool2d(onehot[None], small)[0]
    up = F.interpolate(logits[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    return torch.softmax(up, 0).numpy()


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee"])
def test_matches_pydensecrf_21_classes(name):
    rgb = photo(name, (120, 160))
    probs = net_like_probs(rgb, 21)
    ref = dense_crf(probs, rgb, CrfConfig())
    out = dense_crf_torch(torch.from_numpy(probs), rgb, CrfConfig()).numpy()
    changed = (ref != probs.argmax(0)).mean()
    assert changed > 0.05, f"the CRF barely changed the labels ({changed:.3f}): the comparison would prove little"
    assert (out == ref).mean() >= 0.999


def test_matches_pydensecrf_182_classes():
    rgb = photo("astronaut", (96, 96))
    probs = net_like_probs(rgb, 182, seed=1)
    ref = dense_crf(probs, rgb, CrfConfig())
    out = dense_crf_torch(torch.from_numpy(probs), rgb, CrfConfig())
    assert out.dtype == torch.uint8
    assert (ref != probs.argmax(0)).mean() > 0.05
    assert (out.numpy() == ref).mean() >= 0.999


def test_marginals_match_pydensecrf():
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    rgb = photo("chelsea", (64, 96))
    probs = net_like_probs(rgb, 5, seed=2)
    cfg = CrfConfig(iterations=5)
    d = dcrf.DenseCRF2D(96, 64, 5)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    d.addPairwiseGaussian(sxy=cfg.pos_xy_std, compat=cfg.pos_w)
    d.addPairwiseBilateral(sxy=cfg.bi_xy_std, srgb=cfg.bi_rgb_std, rgbim=rgb, compat=cfg.bi_w)
    ref = np.asarray(d.inference(cfg.iterations), dtype=np.float32).reshape(5, 64, 96)
    q = mean_field(torch.from_numpy(probs), rgb, cfg)[0].numpy()
    np.testing.assert_allclose(q, ref, atol=1e-4)


@pytest.mark.parametrize("kind", ["gaussian", "bilateral"])
def test_normalised_filter_matches_pydensecrf(kind):
    """One iteration with 2 classes exposes densecrf's filter: log(Q1_1 / Q1_0) = -U_1 + U_0 + w (K~Q0_1 - K~Q0_0),
    K~ the symmetric-normalised lattice filter."""
    import pydensecrf.densecrf as dcrf

    rgb = photo("coffee", (48, 64))
    q = np.random.default_rng(3).uniform(0.2, 0.8, (48, 64)).astype(np.float32)
    unary = -np.log(np.stack([1 - q, q])).reshape(2, -1)
    d = dcrf.DenseCRF2D(64, 48, 2)
    d.setUnaryEnergy(np.ascontiguousarray(unary))
    cfg = CrfConfig(pos_xy_std=3, bi_xy_std=20, bi_rgb_std=10)
    if kind == "gaussian":
        d.addPairwiseGaussian(sxy=cfg.pos_xy_std, compat=1.0)
    else:
        d.addPairwiseBilateral(sxy=cfg.bi_xy_std, srgb=cfg.bi_rgb_std, rgbim=rgb, compat=1.0)
    q1 = np.asarray(d.inference(1), dtype=np.float64).reshape(2, -1)
    ref = np.log(q1[1] / q1[0]) + unary[1] - unary[0]

    gauss, bilateral = crf_features(torch.from_numpy(rgb)[None], cfg)
    ops = crf_operators([(gauss if kind == "gaussian" else bilateral, 1.0)])
    msg = apply_chain(ops, torch.softmax(torch.from_numpy(-unary.T), 1).contiguous()).double().numpy()
    assert np.abs(ref).max() > 0.05
    np.testing.assert_allclose(msg[:, 1] - msg[:, 0], ref, atol=2e-6)


def test_batch_matches_one_by_one():
    rgbs = [photo("astronaut", (48, 56)), photo("coffee", (48, 56))]
    probs = [net_like_probs(rgb, 7, seed=i) for i, rgb in enumerate(rgbs)]
    batch = dense_crf_torch(torch.from_numpy(np.stack(probs)), np.stack(rgbs), CrfConfig())
    assert batch.shape == (2, 48, 56)
    for i in range(2):
        assert torch.equal(batch[i], dense_crf_torch(torch.from_numpy(probs[i]), rgbs[i], CrfConfig()))


def test_class_chunks_do_not_change_the_result():
    rgb = photo("chelsea", (40, 48))
    probs = torch.from_numpy(net_like_probs(rgb, 10))
    full = mean_field(probs, rgb, CrfConfig(), class_chunk=10)
    chunked = mean_field(probs, rgb, CrfConfig(), class_chunk=3)  # 4 chunks of 3, the last padded
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-6)


def test_blur_stages_do_not_change_the_filter():
    """Direction by direction (the Gaussian lattice padded with identity stages) or composed 3 at a time."""
    rgb = photo("coffee", (30, 40))
    gauss, bilateral = crf_features(torch.from_numpy(rgb)[None], CrfConfig())
    x = torch.rand(gauss.shape[1], 3)
    one_by_one = crf_operators([(gauss, 3.0), (bilateral, 4.0)], blur_group=1)
    assert len(one_by_one) == 8  # splat, 6 blur stages, slice
    torch.testing.assert_close(apply_chain(crf_operators([(gauss, 3.0), (bilateral, 4.0)]), x),
                               apply_chain(one_by_one, x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    rgb = photo("astronaut", (64, 80))
    probs = torch.from_numpy(net_like_probs(rgb, 21))
    cpu = mean_field(probs, rgb, CrfConfig())
    gpu = mean_field(probs.cuda(), torch.from_numpy(rgb).cuda(), CrfConfig())
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-4)


def test_zero_pairwise_weights_give_argmax():
    rgb = photo("astronaut", (32, 40))
    probs = net_like_probs(rgb, 6)
    out = dense_crf_torch(torch.from_numpy(probs), rgb, CrfConfig(pos_w=0, bi_w=0))
    assert np.array_equal(out.numpy(), probs.argmax(0))


def test_shapes_dtypes_and_errors():
    rgb = photo("coffee", (24, 30))
    probs = torch.from_numpy(net_like_probs(rgb, 4))
    out = dense_crf_torch(probs, torch.from_numpy(rgb), CrfConfig(iterations=2))
    assert out.shape == (24, 30) and out.dtype == torch.uint8 and out.device == probs.device
    assert mean_field(probs, rgb, CrfConfig(iterations=2)).shape == (1, 4, 24, 30)
    many = torch.softmax(torch.randn(300, 8, 9), 0)
    assert dense_crf_torch(many, np.zeros((8, 9, 3), np.uint8), CrfConfig(iterations=1)).dtype == torch.int64
    with pytest.raises(ValueError, match="rgb must be uint8"):
        dense_crf_torch(probs, rgb[:-1], CrfConfig())
    with pytest.raises(ValueError, match="rgb must be uint8"):
        dense_crf_torch(probs, rgb.astype(np.float32), CrfConfig())


def test_simplex_vertices_and_barycentric_weights():
    """Each point is the barycentric combination of its d+1 simplex vertices, which are remainder-0..d lattice
    points (coordinates summing to 0, all = r mod d+1)."""
    features = torch.from_numpy(np.random.default_rng(4).uniform(-20, 20, (500, 5)).astype(np.float32))
    elevated = elevate(features)
    rem0, rank, bary = simplex(elevated)
    d1 = 6
    r = torch.arange(d1)[None, :, None]
    vertices = rem0[:, None, :] + r - d1 * (rank[:, None, :] > d1 - 1 - r).long()  # (N, remainder, coordinate)
    assert torch.all(vertices.sum(2) == 0)
    assert torch.all((vertices - r) % d1 == 0)
    assert torch.all(bary >= -1e-6)
    torch.testing.assert_close(bary.sum(1), torch.ones(500))
    torch.testing.assert_close((bary[:, :, None] * vertices.float()).sum(1), elevated, rtol=0, atol=1e-4)
    torch.testing.assert_close(elevated.sum(1), torch.zeros(500), rtol=0, atol=1e-4)


def test_blur_of_a_delta_spreads_symmetrically():
    xy = torch.stack(torch.meshgrid(torch.arange(12.0), torch.arange(12.0), indexing="ij"), -1).reshape(1, -1, 2)
    _, blurs, _ = build_lattice(xy / 2)
    m = blurs[0][0].shape[0]
    for idx, w in blurs:
        dense = torch.zeros(m, m).index_put_((torch.arange(m)[:, None].expand_as(idx), idx), w, accumulate=True)
        assert torch.equal(dense, dense.T)  # the +1 and -1 neighbour relations are inverse
        both = (w[:, 1] > 0) & (w[:, 2] > 0)
        centre = int(both.nonzero()[0, 0])
        delta = torch.zeros(m, 1)
        delta[centre] = 1
        out = dense @ delta
        assert out[centre, 0] == 1 and sorted(out[idx[centre, 1:], 0].tolist()) == [0.5, 0.5]
        assert out.sum() == 2


def test_filter_of_a_constant_is_constant_after_normalisation():
    rgb = photo("astronaut", (30, 36))
    for features in crf_features(torch.from_numpy(rgb)[None], CrfConfig()):
        ops = lattice_operators(features)
        ones = torch.ones(features.shape[1], 1)
        norm = apply_chain(ops, ones)
        assert torch.all(norm > 0)
        torch.testing.assert_close(apply_chain(ops, 2.5 * ones) / norm, 2.5 * ones)


def test_splat_is_the_transpose_of_slice():
    rgb = photo("chelsea", (20, 24))
    for features in crf_features(torch.from_numpy(rgb)[None], CrfConfig()):
        n, d = features.shape[1:]
        (idx, offsets, w), _, (vertex, bary) = build_lattice(features)
        m = offsets.numel() - 1
        splat = torch.zeros(m, n).index_put_((torch.arange(m).repeat_interleave(offsets.diff()), idx), w,
                                             accumulate=True)
        slice_ = torch.zeros(n, m).index_put_((torch.arange(n)[:, None].expand_as(vertex), vertex), bary,
                                              accumulate=True)
        torch.testing.assert_close(slice_.T * (1 + 2.0**-d), splat)
