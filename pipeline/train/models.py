"""The U-Net of the trainer, 2D and 3D: instance norm, leaky ReLU, Kaiming initialization.

MONAI's ``DynUNet`` (the nnU-Net architecture) is used as the network: two 3×3(×3)
convolutions per level, each followed by instance normalization (affine) and leaky ReLU
(slope 0.01), strided convolutions down, transposed convolutions up, skip connections,
and every convolution initialized with ``kaiming_normal_(a=0.01)`` and zero bias — the
choices of the thesis (Hun 2021, chapter 7). ``SegmentationUNet`` wraps it so that any
input size works: the input is zero-padded to a multiple of ``2**(levels - 1)`` per
spatial axis and the output cropped back.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from monai.networks.nets import DynUNet
from torch import Tensor, nn

Dim = Literal["2d", "3d"]


class SegmentationUNet(nn.Module):
    """U-Net for 2D slices or 3D patches; logits ``(N, out_channels, *spatial)``.

    Parameters
    ----------
    dim : {"2d", "3d"}
        Spatial dimensionality of the inputs ``(N, C, H, W)`` or ``(N, C, D, H, W)``.
    in_channels : int
        Input channels (MRI sequences).
    out_channels : int
        Output channels: 1 for binary (sigmoid) targets, K for K-class softmax targets.
    features : int, default 16
        Feature maps at the first level; doubled per level, capped at ``max_features``.
    levels : int, default 3
        Resolution levels (``levels - 1`` downsamplings by 2).
    max_features : int, default 320
        nnU-Net's cap on the width of the deepest levels.

    Notes
    -----
    Kaiming (He) initialization draws ``W ~ N(0, 2 / ((1 + a²) n_l))`` with ``n_l`` the
    fan-in and ``a = 0.01`` the leaky-ReLU slope (thesis eq. 7.3 with the leaky-ReLU gain);
    biases start at 0. Instance normalization normalizes each sample and channel over its
    spatial axes (Ulyanov et al. 2017).

    References
    ----------
    .. [1] Ronneberger, O., Fischer, P., Brox, T. (2015). U-Net: convolutional networks
       for biomedical image segmentation. MICCAI 2015. arXiv:1505.04597
    .. [2] Isensee, F. et al. (2021). nnU-Net: a self-configuring method for deep
       learning-based biomedical image segmentation. Nature Methods 18, 203-211.
    .. [3] He, K., Zhang, X., Ren, S., Sun, J. (2015). Delving deep into rectifiers.
       ICCV 2015. arXiv:1502.01852
    """

    def __init__(
        self,
        *,
        dim: Dim,
        in_channels: int,
        out_channels: int,
        features: int = 16,
        levels: int = 3,
        max_features: int = 320,
    ) -> None:
        super().__init__()
        if dim not in ("2d", "3d"):
            raise ValueError(f"dim must be '2d' or '3d', got {dim!r}")
        for name, value, low in (("in_channels", in_channels, 1), ("out_channels", out_channels, 1),
                                 ("features", features, 1), ("levels", levels, 3),  # DynUNet needs >= 3
                                 ("max_features", max_features, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.dim = dim
        self.spatial_dims = 2 if dim == "2d" else 3
        self.in_channels, self.out_channels = in_channels, out_channels
        self.levels = levels
        self.divisor = 2 ** (levels - 1)
        filters = [min(features * 2**i, max_features) for i in range(levels)]
        strides = [1] + [2] * (levels - 1)
        self.net = DynUNet(
            spatial_dims=self.spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=[3] * levels,
            strides=strides,
            upsample_kernel_size=strides[1:],
            filters=filters,
            norm_name=("INSTANCE", {"affine": True}),
            act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{self.dim} U-Net expects input (N, {self.in_channels}, "
                f"{', '.join('*' * self.spatial_dims)}), got shape {tuple(x.shape)!r}"
            )
        spatial = x.shape[2:]
        pad: list[int] = []
        for size in reversed(spatial):  # F.pad takes the last axis first
            pad += [0, (-size) % self.divisor]
        if any(pad):
            x = F.pad(x, pad)
        out = self.net(x)
        if any(pad):
            out = out[(..., *(slice(0, s) for s in spatial))]
        return out


def build_unet(
    dim: Dim, in_channels: int, out_channels: int, *, features: int = 16, levels: int = 3
) -> SegmentationUNet:
    """The trainer's U-Net (see ``SegmentationUNet``)."""
    return SegmentationUNet(dim=dim, in_channels=in_channels, out_channels=out_channels,
                            features=features, levels=levels)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["SegmentationUNet", "build_unet", "count_parameters"]
