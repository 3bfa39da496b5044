"""ImageNet weights (`train.init: imagenet`) through torchvision: its weights enums, its hub cache
(`$TORCH_HOME/hub/checkpoints/<file>`, default ~/.cache/torch) and its download check (`check_hash`: a
downloaded file's SHA-256 must start with the hash in its name). Downloaded once, then read from the cache;
read with `weights_only=True`.

The detectors' and segmenters' MobileNetV3 backbones take the classifier's ImageNet weights (`features.*`,
as torchvision's `weights_backbone` loads them) into the network built without weights: torchvision's
builders given `weights_backbone` build another network (frozen batch norms in Faster R-CNN, a full tail in
SSDlite) than the one a model file rebuilds, so SSDlite has none here.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlparse

from torch import Tensor

from visionops.errors import InvalidInputError
from visionops.serving.integrity import file_sha256

# model -> (torchvision weights enum, the classifier those ImageNet weights are for)
WEIGHTS = {
    "resnet18_tv": ("ResNet18_Weights", "resnet18_tv"),
    "mobilenet_v3_large": ("MobileNet_V3_Large_Weights", "mobilenet_v3_large"),
    "fasterrcnn_mobilenet_v3_large_320_fpn": ("MobileNet_V3_Large_Weights", "mobilenet_v3_large"),
    "lraspp_mobilenet_v3_large": ("MobileNet_V3_Large_Weights", "mobilenet_v3_large"),
    "deeplabv3_mobilenet_v3_large": ("MobileNet_V3_Large_Weights", "mobilenet_v3_large"),
}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the normalisation the weights were trained with


def normalisation(channels: int) -> tuple[list[float], list[float]]:
    """ImageNet's per-channel mean and std; for greyscale (repeated to RGB) the mean of the three."""
    if channels == 3:
        return list(MEAN), list(STD)
    return [sum(MEAN) / 3], [sum(STD) / 3]


def cached_file(url: str) -> Path:
    """Where torchvision keeps the file of `url`: $TORCH_HOME/hub/checkpoints/<file name>."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def load(arch: str) -> tuple[dict[str, Tensor], str, dict]:
    """(state dict, the classifier it is for, identity: enum member, file, SHA-256) of `arch`'s ImageNet weights.

    From the cache, else downloaded there once (checked); offline, an InvalidInputError names the file and
    where to put it."""
    import torch
    import torchvision.models as tvm

    enum_name, source_arch = WEIGHTS[arch]
    weights = getattr(tvm, enum_name).IMAGENET1K_V1
    path = cached_file(weights.url)
    try:
        state = torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True, weights_only=True)
    except (URLError, OSError) as exc:
        raise InvalidInputError(
            f"train.init: imagenet: {path.name} is not in {path.parent} and could not be downloaded from "
            f"{weights.url} ({exc}); download it once and put it at $TORCH_HOME/hub/checkpoints/{path.name} "
            f"(here: {path})") from None
    identity = {"weights": f"{enum_name}.IMAGENET1K_V1", "file": path.name, "sha256": file_sha256(path), "url": weights.url}
    return state, source_arch, identity

