"""Training augmentation: geometric on image and maps alike, photometric on the image only.

Geometric augmentation is restricted to the 8 flips/rotations by multiples of 90°:
they move pixels without resampling, so label maps stay exact (no nearest-neighbour
artefacts, no mirror padding to fix) and numpy does them as views, which matters when
training runs on 2 CPU cores. Histology has no preferred orientation, so these 8 cover
what arbitrary rotation would teach a nucleus model, bar the interpolation.

Photometric augmentation imitates what differs between labs and scanners: stain amount
and hue (HED jitter in optical density, after Tellez et al. 2018), brightness/contrast,
and slight defocus (Gaussian blur).
"""

from __future__ import annotations

import cv2
import numpy as np

# Stain vectors for haematoxylin, eosin and DAB (Ruifrok & Johnston), rows in OD space.
_RGB_FROM_HED = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]],
    dtype=np.float64,
)
_RGB_FROM_HED /= np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


def dihedral(arr: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """``arr`` rotated by k x 90° (counter-clockwise, rows/cols axes) then flipped left-right.

    Returns a view; callers copy once after cropping.
    """
    out = np.rot90(arr, k, axes=(0, 1))
    return out[:, ::-1] if flip else out


def hed_jitter(image: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Scale and shift each stain's optical density: ``hed * scale + shift``, back to RGB."""
    rgb = np.maximum(image.astype(np.float32), 1.0) / 255.0
    od = -np.log(rgb)
    hed = od @ _HED_FROM_RGB.astype(np.float32)
    hed = hed * scale.astype(np.float32) + shift.astype(np.float32)
    od = np.maximum(hed @ _RGB_FROM_HED.astype(np.float32), 0.0)
    return np.clip(np.exp(-od) * 255.0 + 0.5, 0, 255).astype(np.uint8)


class Augmenter:
    """Random augmentation for (image, inst_map, type_map) triples.

    ``seed`` (or ``rng``) fixes the stream; every call may instead take its own ``rng``,
    which is how the training dataset keeps results independent of DataLoader workers.
    Probabilities are per transform; the defaults are moderate, so the model still sees
    near-original images often.
    """

    def __init__(
        self,
        seed: int | None = None,
        *,
        rng: np.random.Generator | None = None,
        geometric: bool = True,
        p_stain: float = 0.5,
        stain_scale: float = 0.05,
        stain_shift: float = 0.02,
        p_brightness_contrast: float = 0.5,
        brightness: float = 20.0,
        contrast: float = 0.2,
        p_blur: float = 0.2,
        max_blur_sigma: float = 1.0,
    ) -> None:
        self.rng = rng if rng is not None else np.random.default_rng(seed)
        self.use_geometric = geometric
        self.p_stain, self.stain_scale, self.stain_shift = p_stain, stain_scale, stain_shift
        self.p_bc, self.brightness, self.contrast = p_brightness_contrast, brightness, contrast
        self.p_blur, self.max_blur_sigma = p_blur, max_blur_sigma

    def draw_dihedral(self, rng: np.random.Generator | None = None) -> tuple[int, bool]:
        """A uniformly random element of the 8 flips/rotations (identity if disabled)."""
        rng = rng or self.rng
        if not self.use_geometric:
            return 0, False
        return int(rng.integers(4)), bool(rng.integers(2))

    def geometric(
        self,
        image: np.ndarray,
        inst_map: np.ndarray,
        type_map: np.ndarray | None,
        rng: np.random.Generator | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The same random flip/rotation applied to all three (views, not copies)."""
        k, flip = self.draw_dihedral(rng)
        return (
            dihedral(image, k, flip),
            dihedral(inst_map, k, flip),
            None if type_map is None else dihedral(type_map, k, flip),
        )

    def photometric(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Stain jitter, brightness/contrast and blur on an RGB uint8 image (a new array)."""
        rng = rng or self.rng
        out = np.ascontiguousarray(image)
        if rng.random() < self.p_stain:
            scale = rng.uniform(1 - self.stain_scale, 1 + self.stain_scale, 3)
            shift = rng.uniform(-self.stain_shift, self.stain_shift, 3)
            out = hed_jitter(out, scale, shift)
        if rng.random() < self.p_bc:
            c = rng.uniform(1 - self.contrast, 1 + self.contrast)
            b = rng.uniform(-self.brightness, self.brightness)
            f = out.astype(np.float32)
            mean = f.mean()
            out = np.clip((f - mean) * c + mean + b + 0.5, 0, 255).astype(np.uint8)
        if rng.random() < self.p_blur:
            sigma = rng.uniform(0.1, self.max_blur_sigma)
            out = cv2.GaussianBlur(out, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)
        return out if out is not image else out.copy()

    def __call__(
        self,
        image: np.ndarray,
        inst_map: np.ndarray,
        type_map: np.ndarray | None,
        rng: np.random.Generator | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Augment a triple: geometric on all three, photometric on the image only."""
        rng = rng or self.rng
        image, inst_map, type_map = self.geometric(image, inst_map, type_map, rng)
        image = self.photometric(image, rng)
        inst_map = np.ascontiguousarray(inst_map)
        type_map = None if type_map is None else np.ascontiguousarray(type_map)
        return image, inst_map, type_map
