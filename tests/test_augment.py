import math
from dataclasses import replace

import pytest
import torch

from semibench.data.augment import (
    AugmentConfig,
    PhotometricParams,
    augment_labeled,
    gaussian_blur,
    gaussian_kernels,
    make_views,
    normalise,
    photometric,
    sample_affine,
    sample_crop_pair,
    two_crop_size,
    undo_flips,
    warp,
)
from semibench.data.loading import IMAGENET_MEAN, IMAGENET_STD, make_generator
from semibench.errors import ConfigError

NO_GEO = AugmentConfig(hflip_p=0.0, vflip_p=0.0, crop_scale=(1.0, 1.0), rotation_deg=0.0)
NO_PHOTO = AugmentConfig(jitter_p=0.0, grey_p=0.0, blur_p=0.0)


def gen(seed=0):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def random_batch(n=4, size=32, seed=0):
    g = gen(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    masks = (torch.rand(n, size, size, generator=g) > 0.6).to(torch.uint8)
    return images, masks


def denorm(x):
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return x * std + mean


def test_same_generator_same_views_other_seed_other_views():
    images, masks = random_batch()
    a = augment_labeled(images, masks, gen(1))
    b = augment_labeled(images, masks, gen(1))
    c = augment_labeled(images, masks, gen(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    for kind in ("single", "weak_strong", "two_crops"):
        v1, v2 = make_views(kind, images, gen(5)), make_views(kind, images, gen(5))
        assert v1.keys() == v2.keys() and all(torch.equal(v1[k], v2[k]) for k in v1)


def test_identity_config_is_normalisation_only():
    images, masks = random_batch()
    cfg = replace(NO_GEO, jitter_p=0.0, grey_p=0.0, blur_p=0.0)
    x, y = augment_labeled(images, masks, gen(), cfg)
    torch.testing.assert_close(denorm(x), images.float() / 255, atol=1e-5, rtol=0)
    assert torch.equal(y, masks.long())


def test_flip_only_is_exact_flip():
    images, masks = random_batch()
    cfg = replace(NO_GEO, hflip_p=1.0, jitter_p=0.0, grey_p=0.0, blur_p=0.0)
    x, y = augment_labeled(images, masks, gen(), cfg)
    torch.testing.assert_close(denorm(x), images.float().flip(-1) / 255, atol=1e-5, rtol=0)
    assert torch.equal(y, masks.long().flip(-1))
    cfg = replace(cfg, hflip_p=0.0, vflip_p=1.0)
    x, y = augment_labeled(images, masks, gen(), cfg)
    assert torch.equal(y, masks.long().flip(-2))


def test_affine_parameters_within_paper_ranges():
    cfg = AugmentConfig()
    theta = sample_affine(2000, gen(3), cfg)
    a = theta[:, :, :2]
    scale = torch.sqrt(a[:, 0, 0] ** 2 + a[:, 1, 0] ** 2)  # columns have norm s (rotation × flip)
    assert scale.min() >= 0.7 - 1e-9 and scale.max() <= 1.0 + 1e-9
    det = torch.det(a)
    assert torch.allclose(det.abs(), scale ** 2)
    # a = s R(angle) diag(fx, fy): |a[1,1]| = s |cos|, |a[0,1]| = s |sin|, |angle| <= 15°
    sin = (a[:, 0, 1] / scale).abs()
    assert (a[:, 1, 1] / scale).abs().min() >= math.cos(math.radians(15)) - 1e-9
    assert sin.max() <= math.sin(math.radians(15)) + 1e-9 and sin.max() > math.sin(math.radians(14))
    # both flips happen about half the time; the crop centre keeps the crop inside the image
    assert 0.4 < (a[:, 0, 0] < 0).double().mean() < 0.6
    assert ((theta[:, :, 2].abs() <= (1 - scale)[:, None] + 1e-9)).all()


def test_image_and_mask_get_the_same_geometry():
    # an image whose three channels equal the mask: wherever the bilinear image is exactly 0 or
    # exactly 1 (away from edges) the nearest-neighbour mask must agree
    _, masks = random_batch(n=8, size=48, seed=4)
    blocky = masks.view(8, 12, 4, 12, 4)[:, :, :1, :, :1].expand(8, 12, 4, 12, 4).reshape(8, 48, 48)
    images = (blocky * 255)[:, None].expand(8, 3, 48, 48).contiguous()
    cfg = replace(AugmentConfig(), jitter_p=0.0, grey_p=0.0, blur_p=0.0)
    x, y = augment_labeled(images, blocky, gen(7), cfg)
    v = denorm(x)[:, 0]
    sure_fg, sure_bg = v > 1 - 1e-4, v < 1e-4
    assert sure_fg.sum() > 1000 and sure_bg.sum() > 1000
    assert (y[sure_fg] == 1).all() and (y[sure_bg] == 0).all()
    assert set(y.unique().tolist()) <= {0, 1}


def test_weak_strong_are_pixel_aligned():
    images, _ = random_batch(seed=2)
    v = make_views("weak_strong", images, gen(9), NO_PHOTO)
    assert torch.equal(v["weak"], v["strong"])  # without photometric changes the views coincide
    v = make_views("weak_strong", images, gen(9))
    assert v["weak"].shape == v["strong"].shape == (4, 3, 32, 32)
    assert not torch.equal(v["weak"], v["strong"])
    # the weak view is purely geometric: the same warp as the labeled pipeline without photometric
    w, _ = augment_labeled(images, torch.zeros(4, 32, 32, dtype=torch.uint8), gen(9),
                           replace(AugmentConfig(), labeled_photometric=False))
    assert torch.equal(w, v["weak"])


def test_two_crops_overlap_boxes_show_the_same_pixels():
    images, _ = random_batch(n=16, size=128, seed=3)
    v = make_views("two_crops", images, gen(11), NO_PHOTO, stride=8)
    c = two_crop_size(128, AugmentConfig(), 8)
    assert c == 64 and v["crop1"].shape == v["crop2"].shape == (16, 3, c, c)
    assert v["flip1"].shape == (16, 2) and v["flip1"].dtype == torch.bool
    assert not torch.equal(v["flip1"], v["flip2"])  # each crop draws its own flips
    for i in range(16):
        t1, l1, b1, r1 = v["box1"][i].tolist()
        t2, l2, b2, r2 = v["box2"][i].tolist()
        assert b1 - t1 == b2 - t2 > 0 and r1 - l1 == r2 - l2 > 0
        assert 0 <= t1 < b1 <= c and 0 <= l1 < r1 <= c
        inter = (b1 - t1) * (r1 - l1)
        assert 0.1 <= inter / (2 * c * c - inter) <= 1.0
        a = undo_flips(v["crop1"][i:i + 1], v["flip1"][i:i + 1])[0]
        b = undo_flips(v["crop2"][i:i + 1], v["flip2"][i:i + 1])[0]
        assert torch.equal(a[:, t1:b1, l1:r1], b[:, t2:b2, l2:r2])
    v2 = make_views("two_crops", images, gen(11), stride=8)  # photometric changes differ per crop
    assert not torch.equal(v2["crop1"], v["crop1"])
    with pytest.raises(ConfigError, match="takes no option.*bogus.*it takes: iou, stride"):
        make_views("two_crops", images, gen(11), bogus=1)


def test_crop_pair_offsets_snap_to_the_stride_and_respect_the_iou_range():
    y1, x1, y2, x2 = sample_crop_pair(2000, 100, 40, 8, (0.1, 1.0), gen(4))
    assert ((y2 - y1) % 8 == 0).all() and ((x2 - x1) % 8 == 0).all()
    assert (y2 >= 0).all() and (y2 <= 60).all() and (x2 >= 0).all() and (x2 <= 60).all()
    inter = ((40 - (y2 - y1).abs()) * (40 - (x2 - x1).abs())).double()
    assert ((y2 - y1).abs() < 40).all() and ((x2 - x1).abs() < 40).all()
    assert (inter / (3200 - inter) >= 0.1).all()
    assert (y2 != y1).float().mean() > 0.5  # mostly distinct crops, not the fallback
    # an unreachable IoU range: every pair falls back to identical crops (CAC's fallback)
    y1, x1, y2, x2 = sample_crop_pair(50, 100, 40, 8, (0.99, 0.995), gen(4))
    assert torch.equal(y1, y2) and torch.equal(x1, x2)


def test_single_view_and_unknown_kind():
    images, _ = random_batch()
    assert set(make_views("single", images, gen())) == {"image"}
    with pytest.raises(ConfigError, match="unknown unlabeled view kind 'bogus'.*two_crops"):
        make_views("bogus", images, gen())


def params(n, **kw):
    base = dict(jitter=torch.zeros(n, dtype=torch.bool), brightness=torch.ones(n, dtype=torch.float64),
                contrast=torch.ones(n, dtype=torch.float64), saturation=torch.ones(n, dtype=torch.float64),
                hue=torch.zeros(n, dtype=torch.float64), grey=torch.zeros(n, dtype=torch.bool),
                blur=torch.zeros(n, dtype=torch.bool), sigma=torch.ones(n, dtype=torch.float64))
    base.update(kw)
    return PhotometricParams(**base)


def test_photometric_formulas_by_hand():
    x = torch.tensor([0.2, 0.5, 0.8]).view(1, 3, 1, 1).expand(1, 3, 4, 4).clone()
    on = torch.ones(1, dtype=torch.bool)
    cfg = AugmentConfig()
    # brightness 1.25: every channel × 1.25
    y = photometric(x, params(1, jitter=on, brightness=torch.tensor([1.25], dtype=torch.float64)), cfg)
    torch.testing.assert_close(y[0, :, 0, 0], torch.tensor([0.25, 0.625, 1.0]))
    # greyscale: 0.299·0.2 + 0.587·0.5 + 0.114·0.8 = 0.4445 in every channel
    y = photometric(x, params(1, grey=on), cfg)
    torch.testing.assert_close(y[0, :, 0, 0], torch.full((3,), 0.4445))
    # saturation 0: grey; saturation 1.5: grey + 1.5 (x - grey)
    y = photometric(x, params(1, jitter=on, saturation=torch.tensor([1.5], dtype=torch.float64)), cfg)
    torch.testing.assert_close(y[0, :, 0, 0], 0.4445 + 1.5 * (torch.tensor([0.2, 0.5, 0.8]) - 0.4445))
    # contrast 1.4 blends with the mean grey level (as torchvision): m + 1.4 (x - m), m = 0.4445
    y = photometric(x, params(1, jitter=on, contrast=torch.tensor([1.4], dtype=torch.float64)), cfg)
    torch.testing.assert_close(y[0, :, 0, 0], torch.tensor([0.1022, 0.5222, 0.9422]))
    # hue rotation keeps luminance
    y = photometric(x, params(1, jitter=on, hue=torch.tensor([0.1], dtype=torch.float64)), cfg)
    lum = lambda t: (t[0, :, 0, 0] * torch.tensor([0.299, 0.587, 0.114])).sum()  # noqa: E731
    assert lum(y) == pytest.approx(float(lum(x)), abs=1e-5)
    assert not torch.allclose(y, x)
    # a full turn of hue is the identity; flags off: nothing changes
    y = photometric(x, params(1, jitter=on, hue=torch.tensor([1.0], dtype=torch.float64)), cfg)
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)
    assert torch.equal(photometric(x, params(1), cfg), x)


def test_gaussian_blur():
    k = gaussian_kernels(torch.tensor([1.0], dtype=torch.float64), 3)[0]
    e = torch.exp(-0.5 * torch.arange(-3, 4, dtype=torch.float64) ** 2)
    torch.testing.assert_close(k, e / e.sum())
    const = torch.full((2, 3, 16, 16), 0.3)
    torch.testing.assert_close(gaussian_blur(const, torch.tensor([0.5, 2.0]), 6), const)
    impulse = torch.zeros(1, 1, 15, 15)
    impulse[0, 0, 7, 7] = 1.0
    out = gaussian_blur(impulse, torch.tensor([1.0]), 3)[0, 0]
    kf = k.float()
    torch.testing.assert_close(out[4:11, 4:11], torch.outer(kf, kf))  # separable kernel
    assert out.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_normalise_matches_imagenet_statistics():
    x = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    assert torch.allclose(normalise(x), torch.zeros(1, 3, 1, 1), atol=1e-7)


def test_warp_nearest_keeps_labels_on_device_dtype():
    m = torch.randint(0, 2, (2, 1, 16, 16)).float()
    theta = sample_affine(2, gen(), AugmentConfig())
    out = warp(m, theta, "nearest")
    assert set(out.unique().tolist()) <= {0.0, 1.0}


def test_generator_helper_is_stable():
    a = torch.rand(3, generator=make_generator(0, 13, 2, 5))
    b = torch.rand(3, generator=make_generator(0, 13, 2, 5))
    c = torch.rand(3, generator=make_generator(0, 13, 2, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_augment_config_applies_overrides_and_refuses_bad_values():
    from semibench.data.augment import augment_config
    assert augment_config(None) == AugmentConfig() == augment_config({})
    cfg = augment_config({"rotation_deg": 0, "crop_scale": [1, 1], "hflip_p": 1, "labeled_photometric": False})
    assert cfg == replace(AugmentConfig(), rotation_deg=0.0, crop_scale=(1.0, 1.0), hflip_p=1.0,
                          labeled_photometric=False)
    assert isinstance(cfg.crop_scale, tuple)  # lists from YAML become the dataclass's tuples
    with pytest.raises(ConfigError, match=r"unknown train.augment option\(s\): rotaton; known: blur_p, "):
        augment_config({"rotaton": 5})
    for bad, msg in [({"hflip_p": 1.5}, "hflip_p must be at most 1"),
                     ({"brightness": -0.1}, "brightness must be a number >= 0"),
                     ({"brightness": True}, "brightness must be a number >= 0"),
                     ({"crop_scale": [0.9, 0.5]}, r"crop_scale must satisfy 0 < low <= high <= 1"),
                     ({"crop_scale": [0, 1]}, r"crop_scale must satisfy"),
                     ({"blur_sigma": 2.0}, r"blur_sigma must be a pair \[low, high\]"),
                     ({"labeled_photometric": 0}, "labeled_photometric must be true or false")]:
        with pytest.raises(ConfigError, match=msg):
            augment_config(bad)
