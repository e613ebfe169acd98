"""Geometric augmentation with recorded parameters, the full-image→crop mapping, normalisation.

This module owns the DUDA training view (docs/method.md#data-and-augmentation): a random scale, a
random crop and a horizontal flip of an image already resized to its base size, with no colour
augmentation. The parameters of each draw are kept as a `CropParams` record that collates into a
batch tensor, so the teacher's logits on the full base-size image can be mapped into the student's
crop frame (`full_to_crop`, the `full2weak` mapping of
docs/method.md#the-teachers-full-view-and-the-crop-mapping). It also owns the two input
normalisations (Caffe BGR mean subtraction and ImageNet RGB) and their inverse for visualisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import astuple, dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

Normalization = Literal["caffe_bgr", "imagenet_rgb"]

# docs/method.md#data-and-augmentation: Caffe/DeepLab means, in BGR order, on 0..255 values, std 1.
CAFFE_BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class CropParams:
    """One draw of the training view, in pixels of the base-size image.

    The base image is resized to (scaled_h, scaled_w), the window rows y1:y1+crop_h and columns
    x1:x1+crop_w is cut out, then flipped left-right if `flip`.
    """

    scaled_h: int
    scaled_w: int
    y1: int
    x1: int
    crop_h: int
    crop_w: int
    flip: bool

    def to_tensor(self) -> torch.Tensor:
        """(7,) int64: scaled_h, scaled_w, y1, x1, crop_h, crop_w, flip (0/1)."""
        return torch.tensor([int(value) for value in astuple(self)], dtype=torch.int64)

    @classmethod
    def from_tensor(cls, row: torch.Tensor | Sequence[int]) -> CropParams:
        """Inverse of `to_tensor`; row: (7,) integer tensor or sequence."""
        values = row.tolist() if isinstance(row, torch.Tensor) else list(row)
        if len(values) != 7:
            raise ValueError(f"a crop-parameter row has 7 values, got {len(values)}")
        scaled_h, scaled_w, y1, x1, crop_h, crop_w, flip = (int(v) for v in values)
        return cls(scaled_h, scaled_w, y1, x1, crop_h, crop_w, bool(flip))


def sample_crop_params(
    rng: np.random.Generator,
    base_h: int,
    base_w: int,
    crop_h: int,
    crop_w: int,
    scale_range: tuple[float, float] = (0.51, 1.6),
    flip_probability: float = 0.5,
) -> CropParams:
    """Draw a random scale, crop window and flip (docs/method.md#data-and-augmentation).

    s ~ U(scale_range); the scaled size is (⌊s·base_h⌋, ⌊s·base_w⌋), raised where needed to the
    crop size; the top-left corner is uniform over the integers that keep the window inside;
    flip with probability `flip_probability`.
    """
    scale = float(rng.uniform(scale_range[0], scale_range[1]))
    scaled_h = max(math.floor(scale * base_h), crop_h)
    scaled_w = max(math.floor(scale * base_w), crop_w)
    y1 = int(rng.integers(0, scaled_h - crop_h + 1))
    x1 = int(rng.integers(0, scaled_w - crop_w + 1))
    flip = bool(rng.random() < flip_probability)
    return CropParams(scaled_h, scaled_w, y1, x1, crop_h, crop_w, flip)


def apply_crop(
    image: torch.Tensor, label: torch.Tensor | None, params: CropParams
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale, crop and flip an image and, if given, its label map.

    image: (3, H, W) float at the base size, resized bilinearly (antialias, align_corners=False);
    label: (H, W) integer, resized by nearest neighbour (the pixel-centre rule of PIL/OpenCV), or
    None. Returns the image crop (3, crop_h, crop_w) float and the label crop (crop_h, crop_w) in
    the label's dtype, or None.
    """
    size = (params.scaled_h, params.scaled_w)
    rows = slice(params.y1, params.y1 + params.crop_h)
    columns = slice(params.x1, params.x1 + params.crop_w)
    scaled = F.interpolate(
        image.unsqueeze(0), size=size, mode="bilinear", align_corners=False, antialias=True
    )[0]
    image_crop = scaled[:, rows, columns]
    if params.flip:
        image_crop = image_crop.flip(-1)
    label_crop = None if label is None else crop_label(label, params)
    return image_crop.contiguous(), label_crop


def crop_label(label: torch.Tensor, params: CropParams) -> torch.Tensor:
    """Scale (nearest), crop and flip a label map like `apply_crop` does.

    label: (H, W) integer at the base size. Returns (crop_h, crop_w) in the label's dtype.
    """
    size = (params.scaled_h, params.scaled_w)
    # Class ids 0..255 are exact in float32; 'nearest-exact' samples pixel centres.
    scaled_label = F.interpolate(label[None, None].float(), size=size, mode="nearest-exact")
    label_crop = scaled_label[0, 0, params.y1:params.y1 + params.crop_h,
                              params.x1:params.x1 + params.crop_w].to(label.dtype)
    if params.flip:
        label_crop = label_crop.flip(-1)
    return label_crop.contiguous()


def _params_rows(params: Sequence[CropParams] | torch.Tensor) -> list[CropParams]:
    if isinstance(params, torch.Tensor):
        if params.dim() != 2 or params.shape[1] != 7:
            raise ValueError(f"crop parameters must be (B, 7), got {tuple(params.shape)}")
        return [CropParams.from_tensor(row) for row in params.cpu()]
    return list(params)


def full_to_crop(
    logits: torch.Tensor, params: Sequence[CropParams] | torch.Tensor
) -> torch.Tensor:
    """Map per-pixel maps on the full base-size image into each sample's crop frame.

    docs/method.md#the-teachers-full-view-and-the-crop-mapping (`full2weak`): per sample, resize
    bilinearly with align_corners=True to (scaled_h, scaled_w), cut rows y1:y1+crop_h and columns
    x1:x1+crop_w, flip if recorded. Only the crop window is sampled (one `grid_sample` for the
    batch), which gives the same values as resizing the whole map and slicing. The map may be at any
    resolution: it is taken to cover the base-size frame the parameters were drawn in.
    logits: (B, C, H, W) float; params: B records or a (B, 7) int64 tensor.
    Returns (B, C, crop_h, crop_w) float32.
    """
    rows = _params_rows(params)
    if len(rows) != logits.shape[0]:
        raise ValueError(f"{len(rows)} crop-parameter rows for a batch of {logits.shape[0]}")
    crop_sizes = {(row.crop_h, row.crop_w) for row in rows}
    if len(crop_sizes) != 1:
        raise ValueError(f"all crops of a batch must have one size, got {sorted(crop_sizes)}")
    crop_h, crop_w = crop_sizes.pop()
    device = logits.device
    grids = []
    for row in rows:
        # align_corners=True: scaled pixel X sits at normalised 2·X/(scaled − 1) − 1 of the map.
        ys = torch.arange(row.y1, row.y1 + crop_h, dtype=torch.float32, device=device)
        xs = torch.arange(row.x1, row.x1 + crop_w, dtype=torch.float32, device=device)
        ys = 2.0 * ys / max(row.scaled_h - 1, 1) - 1.0
        xs = 2.0 * xs / max(row.scaled_w - 1, 1) - 1.0
        if row.flip:
            xs = xs.flip(0)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        grids.append(torch.stack((grid_x, grid_y), dim=-1))  # (crop_h, crop_w, 2) as (x, y)
    grid = torch.stack(grids)  # (B, crop_h, crop_w, 2)
    return F.grid_sample(
        logits.float(), grid, mode="bilinear", padding_mode="border", align_corners=True
    )


def normalize(image: np.ndarray | torch.Tensor, mode: Normalization) -> torch.Tensor:
    """Turn an RGB image into the network's input (docs/method.md#data-and-augmentation).

    image: (H, W, 3) uint8 numpy RGB, or a (3, H, W) RGB tensor with values in 0..255.
    caffe_bgr: RGB → BGR, subtract CAFFE_BGR_MEAN, no scaling (the FDA/DeepLab checkpoints);
    imagenet_rgb: /255, subtract IMAGENET_MEAN, divide by IMAGENET_STD (torchvision, IAST).
    Returns (3, H, W) float32.
    """
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"a numpy image must be (H, W, 3), got {image.shape}")
        return torch.from_numpy(_normalize_array(image, mode))
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"an image tensor must be (3, H, W), got {tuple(image.shape)}")
    tensor = image.to(torch.float32)
    if mode == "caffe_bgr":
        mean = torch.tensor(CAFFE_BGR_MEAN, dtype=torch.float32).view(3, 1, 1)
        return tensor.flip(0) - mean
    if mode == "imagenet_rgb":
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
        return (tensor / 255.0 - mean) / std
    raise ValueError(f"normalization {mode!r} is not one of 'caffe_bgr', 'imagenet_rgb'")


def _normalize_array(image: np.ndarray, mode: Normalization) -> np.ndarray:
    """`normalize` of an (H, W, 3) uint8 array in numpy, in place on one copy: the same float32
    operations in the same order (so the same values), without torch's intra-op threads, which
    in a loader thread would compete with the model's."""
    if mode == "caffe_bgr":
        array = image[:, :, ::-1].transpose(2, 0, 1).astype(np.float32)
        array -= np.asarray(CAFFE_BGR_MEAN, np.float32).reshape(3, 1, 1)
        return array
    if mode == "imagenet_rgb":
        array = image.transpose(2, 0, 1).astype(np.float32)
        array /= np.float32(255.0)
        array -= np.asarray(IMAGENET_MEAN, np.float32).reshape(3, 1, 1)
        array /= np.asarray(IMAGENET_STD, np.float32).reshape(3, 1, 1)
        return array
    raise ValueError(f"normalization {mode!r} is not one of 'caffe_bgr', 'imagenet_rgb'")


def denormalize(image: torch.Tensor, mode: Normalization) -> np.ndarray:
    """Inverse of `normalize` for visualisation.

    image: (3, H, W) float. Returns (H, W, 3) uint8 RGB, rounded and clipped to 0..255.
    """
    tensor = image.detach().float().cpu()
    if mode == "caffe_bgr":
        mean = torch.tensor(CAFFE_BGR_MEAN, dtype=torch.float32).view(3, 1, 1)
        rgb = (tensor + mean).flip(0)
    elif mode == "imagenet_rgb":
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
        rgb = (tensor * std + mean) * 255.0
    else:
        raise ValueError(f"normalization {mode!r} is not one of 'caffe_bgr', 'imagenet_rgb'")
    return rgb.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
