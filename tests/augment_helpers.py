"""Inputs for the augmentation tests of test_dataset.py and test_tensors.py (not a test module)."""

import cv2
import numpy as np
import torch

AUG_KEYS = ("angle_deg", "scale", "shift_x", "shift_y", "gamma", "contrast", "brightness")


def aug_row(**values):
    """One sample's augmentation parameters: identity except the values given."""
    params = {"angle_deg": 0.0, "scale": 1.0, "shift_x": 0.0, "shift_y": 0.0, "gamma": 1.0, "contrast": 1.0,
              "brightness": 0.0, **values}
    return torch.tensor([[params[k] for k in AUG_KEYS]], dtype=torch.float32)


def smooth_image(size, seed=0):
    """Random grey values blurred: smooth enough for bilinear interpolation to be compared across libraries."""
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (size, size), dtype=np.uint8), (9, 9), 0)
