"""The patient's image frame, carried with every training sample and every sliding-window tile.

Reports locate findings in the whole image ("upper left lung"), but the network sees patches: random
crops, rotated, scaled and mirrored by nnU-Net's augmentation, and sliding-window tiles at prediction.
Instead of recording each transform's parameters, every case gets three **position channels** when it
is loaded — the pixel's vertical and horizontal position in the (preprocessed) whole image, normalised
to [-1, 1] (``grid_sample``'s ``align_corners=False`` convention), and an "inside the image" flag — and
they travel through nnU-Net's crop, spatial transform and mirroring exactly like the image. After
augmentation each pixel of a sample therefore says where in the patient's image it came from, whatever
crop, rotation, scaling, mirroring or elastic deformation it had; padding outside the image is 0 in all
three channels (``inside`` = 0). The channels are:

- a **position signal** for every text trainer's U-Net (fusion knows where a patch lies), and
- the **sampling grid** of BiCLIP's pseudo-image, which is decoded once in whole-image coordinates and
  read at each pixel's patient-frame position (:func:`sample_patient_frame`) — so a tile's pseudo-image
  is the crop of the case's pseudo-image, and training targets and pseudo-image share one frame.

Intensity augmentation must not touch the position channels: :func:`protect_position_channels` moves
them out of ``image`` (into batchgeneratorsv2's ``regression_target``, which the spatial and mirror
transforms warp like the image and the intensity transforms ignore) before nnU-Net's pipeline and puts
them back as the last channels afterwards.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

POSITION_CHANNELS = 3  # (y, x, inside), appended after the image channels


def position_channels(spatial_shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """(3, *spatial_shape): normalised row and column of each pixel of the whole image, and 1 (inside).

    For nnU-Net's 2D data (shape (Z=1, Y, X)) the leading axes are kept; positions refer to the last two.
    """
    *lead, h, w = spatial_shape
    ys = (2 * (np.arange(h, dtype=np.float64) + 0.5) / h - 1).astype(dtype)
    xs = (2 * (np.arange(w, dtype=np.float64) + 0.5) / w - 1).astype(dtype)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    out = np.stack([yy, xx, np.ones_like(yy)])
    return np.broadcast_to(out.reshape(3, *([1] * len(lead)), h, w), (3, *lead, h, w)).astype(dtype)


def with_position_channels(data: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """(C, *spatial) case -> (C + 3, *spatial) with :func:`position_channels` appended."""
    pos = position_channels(tuple(data.shape[1:]))
    if isinstance(data, torch.Tensor):
        return torch.cat([data, torch.from_numpy(pos).to(data.device, data.dtype)], 0)
    return np.concatenate([np.asarray(data), pos.astype(np.asarray(data).dtype, copy=False)], 0)


_DATASET_CLASSES: dict[type, type] = {}


def patient_frame_dataset(base: type) -> type:
    """A subclass of nnU-Net dataset class ``base`` whose ``load_case`` appends the position channels.

    Created once per base and registered in this module under a stable name, so it pickles by reference
    (nnU-Net's loader workers, spawn start method)."""
    if getattr(base, "adds_position_channels", False):
        return base
    if base not in _DATASET_CLASSES:
        def load_case(self, identifier):
            data, seg, seg_prev, properties = base.load_case(self, identifier)
            return with_position_channels(data[:]), seg, seg_prev, properties

        cls = type(f"PatientFrame{base.__name__}", (base,), {"load_case": load_case, "adds_position_channels": True,
                                                              "__module__": __name__})
        globals()[cls.__name__] = cls
        _DATASET_CLASSES[base] = cls
    return _DATASET_CLASSES[base]


class StashPositionChannels(BasicTransform):
    """Moves the last 3 image channels into ``regression_target`` (spatial transforms warp it like the
    image; intensity transforms leave it alone)."""

    def apply(self, data_dict: dict, **params) -> dict:
        if data_dict.get("regression_target") is not None:
            raise RuntimeError("StashPositionChannels needs the regression_target slot, which is already in use.")
        img = data_dict["image"]
        data_dict["image"], data_dict["regression_target"] = img[:-POSITION_CHANNELS], img[-POSITION_CHANNELS:]
        return data_dict


class RestorePositionChannels(BasicTransform):
    """Appends the stashed position channels to the image again (after all other transforms)."""

    def apply(self, data_dict: dict, **params) -> dict:
        pos = data_dict.pop("regression_target")
        data_dict["image"] = torch.cat([data_dict["image"], pos.to(data_dict["image"].dtype)], 0)
        return data_dict


def protect_position_channels(pipeline: ComposeTransforms) -> ComposeTransforms:
    """nnU-Net's training pipeline with the position channels kept out of its intensity transforms."""
    return ComposeTransforms([StashPositionChannels(), *pipeline.transforms, RestorePositionChannels()])


def ensure_position_channels(x: torch.Tensor, expected_channels: int, who: str) -> torch.Tensor:
    """x as the network expects it: (B, expected_channels, H, W), image then position channels.

    Plain ``nnUNetv2_predict`` (which knows nothing of position channels) passes the image alone; then each
    tile is taken as the whole image, with a warning, rather than failing."""
    if x.shape[1] == expected_channels:
        return x
    if x.shape[1] == expected_channels - POSITION_CHANNELS:
        import warnings
        warnings.warn(f"{who}: input without patient-frame position channels (plain nnUNetv2_predict?): each "
                      f"tile is taken as the whole image. Predict with nnUNetv2_textseg_predict.")
        pos = torch.from_numpy(position_channels(tuple(x.shape[2:]))).to(x.device, x.dtype)
        return torch.cat([x, pos[None].expand(x.shape[0], *pos.shape)], 1)  # 2D or 3D tiles
    raise ValueError(f"{who}: expected {expected_channels} input channels (image + {POSITION_CHANNELS} position), "
                     f"got {x.shape[1]}")


def split_position(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C + 3, H, W) -> image (B, C, H, W), position (B, 3, H, W)."""
    return x[:, :-POSITION_CHANNELS], x[:, -POSITION_CHANNELS:]


def sample_patient_frame(frame_map: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Read a whole-image map at each pixel's patient-frame position.

    frame_map: (B or 1, K, S, S') covering the whole image ([-1, 1]² in ``align_corners=False`` terms);
    position: (B, 3, H, W) position channels. Returns (B, K, H, W); 0 where ``inside`` is 0 (padding).
    """
    b = position.shape[0]
    if frame_map.shape[0] == 1 and b > 1:
        frame_map = frame_map.expand(b, -1, -1, -1)
    inside = position[:, 2:3]
    # where inside is partly 0 (interpolated at the padding edge), rescale the coordinates back
    grid = (position[:, [1, 0]] / inside.clamp_min(1e-3)).clamp(-1, 1).permute(0, 2, 3, 1)
    out = F.grid_sample(frame_map, grid.to(frame_map.dtype), mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out * (inside > 0.5).to(out.dtype)
