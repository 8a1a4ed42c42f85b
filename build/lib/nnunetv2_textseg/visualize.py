"""Per-case maps (uncertainty, pseudo-images) back in the input's geometry, as image files + PNG previews."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt
import numpy as np
import SimpleITK as sitk
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image


MAP_FOLDERS = {"entropy": "uncertainty", "variance": "uncertainty", "mutual_information": "uncertainty",
               "pseudo": "pseudo_images"}


def to_original_geometry(volume: np.ndarray | torch.Tensor, props: dict, plans_manager, configuration_manager,
                         fill: float = 0.0) -> np.ndarray:
    """Undo nnU-Net's preprocessing geometry for one map in preprocessed layout (Z, Y, X): resample to
    the cropped shape, put it back into the uncropped image, undo the transpose (as nnU-Net's export does)."""
    vol = torch.as_tensor(np.asarray(volume, dtype=np.float32))[None]
    spacing_t = [props["spacing"][i] for i in plans_manager.transpose_forward]
    shape = props["shape_after_cropping_and_before_resampling"]
    current = configuration_manager.spacing if len(configuration_manager.spacing) == len(shape) \
        else [spacing_t[0], *configuration_manager.spacing]
    vol = configuration_manager.resampling_fn_probabilities(vol, shape, current, spacing_t)
    vol = np.asarray(vol)[0]
    full = np.full(props["shape_before_cropping"], fill, dtype=np.float32)
    full = insert_crop_into_image(full, vol, props["bbox_used_for_cropping"])
    return np.asarray(full).transpose(plans_manager.transpose_backward)


def write_map(arr: np.ndarray, props: dict, path: str | Path) -> Path:
    """Float map as NIfTI with the case's spacing (2D images are written as 2D)."""
    spacing = list(props["spacing"])[::-1]
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr, spacing = arr[0], spacing[:2]
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing([float(s) for s in spacing])
    stuff = props.get("sitk_stuff")  # medical images: keep origin and direction so maps overlay in viewers
    if stuff and arr.ndim == 3:
        img.SetOrigin(stuff["origin"])
        img.SetDirection(stuff["direction"])
    sitk.WriteImage(img, str(path))
    return Path(path)


def save_overlay_png(image: np.ndarray, overlay: np.ndarray, path: str | Path, title: str, cmap: str = "magma") -> None:
    """Middle slice of ``image`` in grey with ``overlay`` on top, plus a colour bar."""
    if image.ndim == 3:
        z = image.shape[0] // 2
        image, overlay = image[z], overlay[z]
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    axes[0].imshow(image, cmap="gray")
    axes[0].set_title("input")
    if cmap == "gray":  # an image in its own right (pseudo-image): shown alone, not as an overlay
        im = axes[1].imshow(overlay, cmap=cmap)
    else:
        axes[1].imshow(image, cmap="gray")
        im = axes[1].imshow(overlay, cmap=cmap, alpha=0.6)
    axes[1].set_title(title)
    for a in axes:
        a.axis("off")
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_case_maps(maps: dict[str, torch.Tensor], image: torch.Tensor, props: dict, ofile: str,
                   plans_manager, configuration_manager) -> list[Path]:
    """Write ``SUBFOLDER/{case}_{name}.nii.gz`` and ``.png`` for every map (preprocessed layout), beside the
    segmentations but in subfolders (``uncertainty/``, ``pseudo_images/``), so that nnU-Net's evaluation of
    the output folder sees only segmentations."""
    written = []
    if not maps:
        return written
    ofile = Path(ofile)
    img = to_original_geometry(image.float().cpu().numpy(), props, plans_manager, configuration_manager)
    for name, m in maps.items():
        folder = ofile.parent / MAP_FOLDERS.get(name, name)
        folder.mkdir(parents=True, exist_ok=True)
        stem = folder / f"{ofile.name}_{name}"
        arr = to_original_geometry(m.float().cpu().numpy(), props, plans_manager, configuration_manager)
        written.append(write_map(arr, props, f"{stem}.nii.gz"))
        save_overlay_png(img, arr, f"{stem}.png", name, cmap="gray" if name == "pseudo" else "magma")
        written.append(Path(f"{stem}.png"))
    return written
