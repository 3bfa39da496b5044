"""Each architecture's encoder: the layers a starting point transfers and self-supervised pretraining trains.

An encoder is a list of (prefix in the network's state dict, canonical prefix) pairs. Canonical names are
shared within a family, so an encoder moves between architectures and tasks by name and shape alone: a
`mobilenet_v3_large` classifier's `features.*` are our Faster R-CNN wrapper's `net.backbone.body.*` and
LR-ASPP's `net.backbone.*`, as torchvision itself loads ImageNet weights into those backbones;
`centernet_backbone` and `unet_backbone` (classifiers) have CenterNet's and the U-Net's `stem`, `down4` and
`down8`. Tensors whose shapes differ are not transferred (the caller reports them). Prefixes are relative
to the bare network (a Classifier's, Detector's or Segmenter's `.net`).
"""

from __future__ import annotations

from torch import Tensor, nn

from visionops.errors import InvalidInputError

_RESNET = (("stem.", "stem."), ("stages.", "stages."))
_STRIDE8 = (("stem.", "stem."), ("down4.", "down4."), ("down8.", "down8."))
_TV_RESNET = tuple((f"{p}.", f"{p}.") for p in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"))

ENCODERS: dict[str, tuple[tuple[str, str], ...]] = {
    **dict.fromkeys(("resnet", "resnet8", "resnet18", "resnet20", "slim_resnet"), _RESNET),
    "lenet": (("features.", "features."),),
    "mobilenet_tiny": (("features.", "features."),),
    **dict.fromkeys(("centernet", "centernet_tiny", "centernet_backbone", "unet", "unet_small", "unet_backbone"), _STRIDE8),
    "resnet18_tv": _TV_RESNET,
    "mobilenet_v3_large": (("features.", "features."),),
    "fasterrcnn_mobilenet_v3_large_320_fpn": (("net.backbone.body.", "features."),),
    "lraspp_mobilenet_v3_large": (("net.backbone.", "features."),),
    "deeplabv3_mobilenet_v3_large": (("net.backbone.", "features."),),
}


_RGB_ONLY = ("fasterrcnn_mobilenet_v3_large_320_fpn", "lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large",
             "resnet18_tv", "mobilenet_v3_large")


def encoder_prefixes(arch: str) -> tuple[tuple[str, str], ...]:
    """The (network prefix, canonical prefix) pairs of `arch`'s encoder; an InvalidInputError names an
    architecture that has none to transfer or pretrain."""
    try:
        return ENCODERS[arch]
    except KeyError:
        raise InvalidInputError(f"model {arch!r} has no encoder to transfer or pretrain; models with one: "
                                f"{', '.join(sorted(ENCODERS))}") from None


def encoder(net: nn.Module, arch: str) -> nn.Sequential:
    """`net`'s encoder as one module: images (N, C, H, W) -> a feature map (N, D, h, w)."""
    parts = []
    for prefix, _ in encoder_prefixes(arch):
        module = net.get_submodule(prefix.rstrip("."))
        parts += list(module.children()) if isinstance(module, nn.ModuleDict) else [module]  # torchvision's layer getters
    if arch == "resnet18_tv":
        parts = [parts[0], parts[1], nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1), *parts[2:]]
    if arch in _RGB_ONLY:  # torchvision's networks take three channels (models.detection._three_channels, models.backbones)
        parts = [_Rgb(), *parts]
    return nn.Sequential(*parts)


class _Rgb(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def to_canonical(state: dict[str, Tensor], arch: str) -> dict[str, Tensor]:
    """The encoder's tensors of `state` (a bare network's state dict), under their canonical names."""
    out = {}
    for prefix, canon in encoder_prefixes(arch):
        out.update({canon + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return out


def from_canonical(state: dict[str, Tensor], arch: str) -> dict[str, Tensor]:
    """Canonically named encoder tensors renamed to `arch`'s own keys (names `arch` lacks are dropped)."""
    out = {}
    for prefix, canon in encoder_prefixes(arch):
        out.update({prefix + k[len(canon):]: v for k, v in state.items() if k.startswith(canon)})
    return out
