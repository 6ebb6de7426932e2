"""Issue 12 points 6, 7, 8, 10, 13, 15 (and 13.8's augmentation figure): what reaches the model is made the
same way in training and evaluation, padded slices reach nothing, downscaling averages, and the cache follows
the code and the DICOM files it was made from, with workers that die with their parent.

Everything runs the notebook's own definitions (the `nb` fixture); expected values come from OpenCV, numpy
and hand computation here."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from augment_helpers import aug_row, smooth_image  # tests/ is on sys.path (rootdir)
from make_demo_studies import make_study_set  # tools/ is put on sys.path by conftest.py
from pydicom.dataset import Dataset

BLACK = [(0 - m) / s for m, s in zip([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]  # normalised 0


def fake_header(spacing):
    ds = Dataset()
    ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]  # sagittal
    ds.ImagePositionPatient = [12.5, -80.0, 95.0]
    ds.PixelSpacing = [spacing, spacing]
    return ds


def point_mm(ds, x, y):
    """Patient-space position of pixel (column x, row y) of a slice (DICOM C.7.6.2.1.1)."""
    iop = np.asarray(ds.ImageOrientationPatient, float)
    spacing_row, spacing_col = (float(v) for v in ds.PixelSpacing)
    return np.asarray(ds.ImagePositionPatient, float) + x * spacing_col * iop[:3] + y * spacing_row * iop[3:]


# ---------------------------------------------------------------------- 6. padded slices are isolated
@pytest.fixture(scope="module")
def small_model(nb):
    """SpineModelV9 with a one-convolution backbone of the same width: an untrained MobileNet in eval mode
    gives features of ~1e-9 whatever the input, which would hide what reaches the GRU."""
    torch.manual_seed(0)
    model = nb["SpineModelV9"]({**nb["CONFIG"], "gru_hidden": 32, "attention_hidden": 16})
    model.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, model.gru.input_size, 8, stride=8), torch.nn.ReLU())
    return model.eval()


def padded_pair(size=48):
    """Two batches that differ only in their padded slices (random pixels in one, other random pixels in the
    other), with a mask padding both ends of the series: sample 0 starts at the series' first slice, sample 1
    ends at its last."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 7, 3, size, size), dtype=torch.uint8, generator=g)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, :2] = False
    mask[1, 5:] = False
    other = images.clone()
    other[~mask] = torch.randint(0, 256, other[~mask].shape, dtype=torch.uint8, generator=g)
    assert not torch.equal(images, other) and torch.equal(images[mask], other[mask])
    return images, other, mask


def test_padded_slice_pixels_change_neither_logits_nor_attention(nb, small_model):
    images, other, mask = padded_pair()
    levels = torch.tensor([1, 3])
    with torch.no_grad():
        logits, weights = small_model(nb["to_model_input"](images), levels, mask)
        logits2, weights2 = small_model(nb["to_model_input"](other), levels, mask)
        unmasked, _ = small_model(nb["to_model_input"](images), levels)
        unmasked2, _ = small_model(nb["to_model_input"](other), levels)
    assert (unmasked2 - unmasked).abs().max() > 1e-3  # without a mask, those pixels do reach the logits
    torch.testing.assert_close(logits2, logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(weights2, weights, atol=1e-7, rtol=0)
    assert (weights[~mask] == 0).all() and torch.allclose(weights.sum(1), torch.ones(2))


def test_training_input_keeps_padded_slices_black_noise_included(nb, config):
    images, other, mask = padded_pair(size=nb["crop_side"](config))
    images, other = images[:, :, :1], other[:, :, :1]  # one channel, as the loader ships them
    aug = torch.from_numpy(np.stack([nb["draw_augmentation"](np.random.default_rng([0, 1, i]), config)
                                     for i in range(2)]))
    outputs = []
    for batch in (images, other):
        torch.manual_seed(0)
        outputs.append(nb["to_model_input"](batch, aug, mask, 0.1, size=config["img_size"]))
    out, out2 = outputs
    for c in range(3):
        padded = out[:, :, c][~mask]
        assert (padded - BLACK[c]).abs().max() < 1e-6, "a padded slice is not black"
    torch.testing.assert_close(out2, out, atol=0, rtol=0)
    real = out[:, :, 0][mask]
    assert real.std() > 0.5 and (real - BLACK[0]).abs().gt(0.1).float().mean() > 0.9  # real slices are not


# ------------------------------------------------------- 7. cached margin: warp, then the centre, for both
@pytest.fixture(scope="module")
def config(nb, tmp_path_factory):
    return {**nb["CONFIG"], "cache_dir": str(tmp_path_factory.mktemp("cache_tensors"))}


def test_cached_side_has_room_for_the_largest_warp(nb, config):
    size, side = config["img_size"], nb["crop_side"](config)
    assert side % 2 == 0 and 1.4 * size <= side <= 1.5 * size
    assert nb["crop_side"]({**config, "img_size": 256}) in range(int(1.4 * 256), int(1.5 * 256) + 1)
    with pytest.raises(ValueError, match="aug_rotate"):
        nb["crop_side"]({**config, "aug_rotate": 30.0})


@pytest.mark.parametrize("img_size", [64, 256])
def test_largest_warp_of_a_bright_cached_crop_has_no_black_pixel(nb, config, img_size):
    cfg = {**config, "img_size": img_size}
    side = nb["crop_side"](cfg)
    images = torch.full((1, 7, 1, side, side), 200, dtype=torch.uint8)
    mask = torch.ones(1, 7, dtype=torch.bool)
    mean, std = 0.485, 0.229
    for angle in (-1, 1):
        for sx in (-1, 1):
            for sy in (-1, 1):
                aug = aug_row(angle_deg=angle * cfg["aug_rotate"], scale=1 - cfg["aug_scale"],
                              shift_x=sx * cfg["aug_shift"], shift_y=sy * cfg["aug_shift"])
                out = nb["to_model_input"](images, aug, mask, size=img_size)
                assert out.shape == (1, 7, 3, img_size, img_size)
                grey = out[0, :, 0] * std + mean
                assert grey.min() > 200 / 255 - 1e-5, (angle, sx, sy, float(grey.min()))  # no black corner
                assert grey.max() < 200 / 255 + 1e-5


def test_evaluation_input_is_the_centre_of_the_cache(nb, config):
    size, side = config["img_size"], nb["crop_side"](config)
    start = (side - size) // 2
    stack = torch.from_numpy(np.stack([smooth_image(side, seed) for seed in range(7)]))[None, :, None]
    centre = stack[..., start:start + size, start:start + size]
    mask = torch.ones(1, 7, dtype=torch.bool)
    torch.testing.assert_close(nb["to_model_input"](stack, size=size), nb["to_model_input"](centre), atol=0, rtol=0)
    # training with the identity transform sees exactly the evaluation field of view
    torch.testing.assert_close(nb["to_model_input"](stack, aug_row(), mask, size=size), nb["to_model_input"](centre),
                               atol=1e-5, rtol=0)


def test_device_warp_of_the_cached_crop_is_opencv_warp_then_centre(nb, config):
    size, side = config["img_size"], nb["crop_side"](config)
    start = (side - size) // 2
    base = smooth_image(side)
    x = torch.from_numpy(base).float().div(255).view(1, 1, 1, side, side)
    mask = torch.ones(1, 1, dtype=torch.bool)
    for angle, scale, sx, sy in [(10.0, 0.9, 0.06, -0.06), (-7.0, 1.1, -0.03, 0.05)]:
        out = nb["augment_on_device"](x, aug_row(angle_deg=angle, scale=scale, shift_x=sx, shift_y=sy), mask, size)
        affine = cv2.getRotationMatrix2D(((side - 1) / 2, (side - 1) / 2), angle, scale)
        affine[:, 2] += np.array([sx, sy]) * size  # the shift is a fraction of the field of view
        warped = cv2.warpAffine(base.astype(np.float32) / 255, affine, (side, side), flags=cv2.INTER_LINEAR)
        expected = warped[start:start + size, start:start + size]
        diff = np.abs(out[0, 0, 0].numpy() - expected)  # every pixel: the margin leaves no border to skip
        assert diff.max() < 0.01 and diff.mean() < 0.002, (angle, diff.max(), diff.mean())


def test_dataset_ships_the_margin_for_training_and_the_centre_for_evaluation(nb, config):
    size, side = config["img_size"], nb["crop_side"](config)
    assert side > size  # the cache holds a margin around the field of view
    start = (side - size) // 2
    images = np.stack([np.stack([smooth_image(side, 10 * k + j) for j in range(7)]) for k in range(3)])
    samples = pd.DataFrame({"cache_index": [2, 0], "study_id": [1, 2], "level_idx": [0, 4], "target_idx": [0, 4],
                            "label": [0, 2]})
    masks = np.ones((3, 7), bool)
    train = nb["RSNADatasetV9"](samples, images, masks, config, train=True)[0]
    evaluation = nb["RSNADatasetV9"](samples, images, masks, config, train=False)[0]
    assert torch.equal(train["image"][:, 0], torch.from_numpy(images[2]))
    centre = images[2, :, start:start + size, start:start + size]
    assert torch.equal(evaluation["image"][:, 0], torch.from_numpy(centre))


# ------------------------------------------------------------------------- 8. shrinking really averages
def test_fine_checkerboard_averages_to_mid_grey(nb, config):
    spacing = 0.1  # 600 source pixels across crop_mm 60 at img_size 64: about 10 source pixels per output pixel
    n = 1200
    board = ((np.indices((n, n)).sum(0) % 2) * 255).astype(np.uint8)
    ds = fake_header(spacing)
    out = nb["crop_slice"](board, ds, point_mm(ds, n / 2, n / 2), config)
    assert out.shape == (nb["crop_side"](config),) * 2
    assert abs(out.mean() - 127.5) < 2 and out.std() < 2, (out.mean(), out.std())  # a plain mid-grey


def test_shrinking_by_4_is_the_mean_of_each_4x4_block(nb, config):
    size, side = config["img_size"], nb["crop_side"](config)
    spacing, m = 0.25, 4
    cfg = {**config, "crop_mm": size * spacing * m}  # four source pixels per output pixel
    image = np.random.default_rng(3).integers(0, 256, (400, 400), dtype=np.uint8)
    ds = fake_header(spacing)
    # the annotated point 200.5 sits at output pixel centre side / 2, i.e. the centre of the block that starts
    # m * side / 2 + (m - 1) / 2 source pixels earlier: on a whole pixel
    out = nb["crop_slice"](image, ds, point_mm(ds, 200.5, 200.5), cfg)
    first = round(200.5 - m * side / 2 - (m - 1) / 2)
    blocks = image[first:first + m * side, first:first + m * side].reshape(side, m, side, m).astype(float)
    assert out.shape == (side, side)
    assert np.abs(out - blocks.mean(axis=(1, 3))).max() <= 1.0  # uint8 rounding only


# ------------------------------------------------------------------------ 10. the code's version in the key
def test_preprocessing_version_is_in_the_cache_key(nb, monkeypatch, config):
    samples = pd.DataFrame({"study_id": [1], "series_id": [2], "instance_number": [3], "x": [4.0], "y": [5.0]})
    before = nb["cache_folder"](samples, config)[0]
    monkeypatch.setitem(nb, "PREPROCESS_VERSION", nb.get("PREPROCESS_VERSION", 0) + 1)
    assert nb["cache_folder"](samples, config)[0] != before


# ------------------------------------------------------------------ 13. the cache follows the DICOM files
@pytest.fixture()
def small_set(nb, tmp_path):
    root = tmp_path / "data"
    make_study_set(root, n_studies=2, seed=5)
    cfg = {**nb["CONFIG"], "data_root": str(root), "cache_dir": str(tmp_path / "cache")}
    samples, _ = nb["build_sample_table"](cfg)
    assert samples["study_id"].nunique() == 2
    return cfg, samples


def fresh_build(nb, samples, cfg, folder):
    kept, images, masks, failures = nb["build_cache"](samples, {**cfg, "cache_dir": str(folder)}, 0)
    return kept, np.array(images), masks, failures


def test_series_replaced_in_place_is_rebuilt_alone(nb, small_set, tmp_path, capsys):
    cfg, samples = small_set
    kept, images, _, _ = nb["build_cache"](samples, cfg, 0)
    images = np.array(images)
    path = Path(samples["path"].iloc[0])  # the annotated file of the first study, replaced by a flipped image
    ds = pydicom.dcmread(path)
    ds.decompress()
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[::-1]).tobytes()
    ds.save_as(path)
    capsys.readouterr()
    kept2, images2, _, failures2 = nb["build_cache"](samples, cfg, 0)
    printed = capsys.readouterr().out
    assert "of 1 series changed" in printed and "1 series rebuilt" in printed
    assert "cache reused" not in printed
    replaced = (kept2["series_id"] == samples["series_id"].iloc[0]).to_numpy()
    expected = fresh_build(nb, samples, cfg, tmp_path / "fresh")
    np.testing.assert_array_equal(np.array(images2), expected[1])  # what a new cache would hold
    assert not np.array_equal(images[replaced], expected[1][replaced])  # the replaced series changed
    np.testing.assert_array_equal(images[~replaced], expected[1][~replaced])  # the other did not
    assert len(failures2) == 0
    capsys.readouterr()
    nb["build_cache"](samples, cfg, 0)
    assert "cache reused" in capsys.readouterr().out  # and once rebuilt, it is reused


@pytest.mark.filterwarnings("ignore:End of file reached")  # pydicom on the truncated file
def test_file_repaired_after_a_failed_build_is_rebuilt(nb, small_set, tmp_path, capsys):
    cfg, samples = small_set
    path = Path(samples["path"].iloc[0])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    kept, _, _, failures = nb["build_cache"](samples, cfg, 0)
    study = samples["study_id"].iloc[0]
    assert set(failures["study_id"]) == {study} and study not in set(kept["study_id"])
    path.write_bytes(data)  # repaired
    capsys.readouterr()
    kept2, images2, masks2, failures2 = nb["build_cache"](samples, cfg, 0)
    assert "rebuilt" in capsys.readouterr().out
    assert len(failures2) == 0 and len(kept2) == len(samples)
    expected = fresh_build(nb, samples, cfg, tmp_path / "fresh")
    np.testing.assert_array_equal(np.array(images2), expected[1])
    np.testing.assert_array_equal(masks2, expected[2])
    pd.testing.assert_frame_equal(kept2, expected[0])


# -------------------------------------------------------------- 15. workers do not outlive their parent
def alive(pid):
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status  # a zombie has exited; its reaper may be slow


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_cache_workers_die_when_the_notebook_is_killed(study_set, tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    script = tmp_path / "kernel.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1] / "tools")!r})
        from notebook_cells import notebook_namespace

        def slow(job):  # a series that takes a minute: the build is still running when the parent is killed
            Path({str(pids)!r}, str(os.getpid())).touch()
            time.sleep(60)

        ns = notebook_namespace({{"data_root": {str(study_set)!r}, "output_dir": {str(tmp_path / "out")!r},
                                  "num_workers": 2, "img_size": 32, "conditions": ["spinal_canal_stenosis"]}})
        ns["preprocess_series"] = slow
        samples, _ = ns["build_sample_table"](ns["CONFIG"])
        ns["build_cache"](samples, ns["CONFIG"], 2)
    """))
    kernel = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    workers = []
    try:
        deadline = time.time() + 180
        while len(workers) < 2 and time.time() < deadline and kernel.poll() is None:
            time.sleep(0.2)
            workers = [int(p.name) for p in pids.iterdir()]
        assert len(workers) == 2, kernel.stderr.read().decode()[-2000:] if kernel.poll() is not None else "no workers"
        assert all(alive(pid) for pid in workers)
        os.kill(kernel.pid, signal.SIGKILL)  # what a killed notebook kernel gets
        kernel.wait()
        deadline = time.time() + 5
        while any(alive(pid) for pid in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in workers if alive(pid)], "cache workers outlived the killed parent"
    finally:
        if kernel.poll() is None:
            kernel.kill()
        for pid in workers:  # the ones this test started, should any survive
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------- 13.8 augmentation figure
def test_augmentation_figure_numbers_epochs_as_training(nb, config):
    size, side = config["img_size"], nb["crop_side"](config)
    images = np.stack([np.stack([smooth_image(side, j) for j in range(7)])])
    samples = pd.DataFrame({"cache_index": [0], "study_id": [1], "level_idx": [2], "target_idx": [2], "label": [1]})
    epochs = nb["plot_augmentations"](samples, images, np.ones((1, 7), bool), config, views=3, name="test_aug_epochs")
    (nb["FIGURES"] / "test_aug_epochs.png").unlink()
    assert epochs == [1, 2, 3]  # train_fold's first epoch is 1
    assert size < side
