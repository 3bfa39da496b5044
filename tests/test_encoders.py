"""Encoders by canonical name: one family's encoder moves between tasks by name and shape alone."""

import pytest
import torch

from visionops.errors import InvalidInputError
from visionops.models import create_model
from visionops.models.encoders import encoder, from_canonical, to_canonical


@pytest.mark.parametrize("arch", ["resnet20", "lenet", "mobilenet_tiny", "centernet", "unet"])
def test_encoder_round_trip_and_feature_map(arch):
    net = create_model(arch, in_channels=3, num_classes=3, image_size=32)
    state = net.state_dict()
    canon = to_canonical(state, arch)
    assert canon and all(torch.equal(state[k], v) for k, v in from_canonical(canon, arch).items())
    assert len(from_canonical(canon, arch)) == len(canon)
    assert encoder(net, arch)(torch.zeros(2, 3, 32, 32)).ndim == 4


def test_mobilenet_classifier_features_are_the_detectors_and_segmenters_backbone():
    torchvision = pytest.importorskip("torchvision")
    features = {k: v for k, v in torchvision.models.mobilenet_v3_large(weights=None).state_dict().items()
                if k.startswith("features.")}
    for arch in ("fasterrcnn_mobilenet_v3_large_320_fpn", "lraspp_mobilenet_v3_large"):
        net = create_model(arch, in_channels=1, num_classes=2, image_size=64)
        own = net.state_dict()
        renamed = from_canonical(features, arch)
        assert len(renamed) == len(features)
        assert all(own[k].shape == v.shape for k, v in renamed.items())
        assert encoder(net, arch)(torch.zeros(1, 1, 64, 64)).shape[1] == 960


def test_a_model_without_an_encoder_is_named():
    with pytest.raises(InvalidInputError, match="'fastnet'"):
        to_canonical({}, "fastnet")
