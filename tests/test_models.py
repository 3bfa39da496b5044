"""The model registry and every registered architecture."""

import pytest
import torch
from torch import nn

from visionops.model_names import NARROWS
from visionops.models import count_parameters, create_model, list_models, register_model
from visionops.models.narrow import narrow_into


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", list_models("classification"))  # (N, classes) logits
def test_forward_and_backward(name, in_channels):
    torch.manual_seed(0)
    model = create_model(name, in_channels=in_channels, num_classes=10, image_size=32)
    x = torch.randn(4, in_channels, 32, 32)
    logits = model(x)
    assert logits.shape == (4, 10)
    logits.logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("image_size", [16, 28])
@pytest.mark.parametrize("name", list_models("classification"))  # (N, classes) logits
def test_other_image_sizes(name, image_size):
    model = create_model(name, in_channels=1, num_classes=7, image_size=image_size).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, image_size, image_size)).shape == (2, 7)


def test_expected_models_are_registered():
    assert {"lenet", "resnet", "resnet20", "resnet18", "slim_resnet", "fastnet", "mobilenet_tiny"} <= set(
        list_models()
    )


def test_lenet_structure_and_parameter_count():
    model = create_model("lenet", in_channels=3, num_classes=10, image_size=32)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(6, (5, 5)), (16, (5, 5))]
    assert [(l.in_features, l.out_features) for l in linears] == [(400, 120), (120, 84), (84, 10)]
    assert count_parameters(model) == 62_006
    # The classic 61,706 is LeNet-5 on 1x32x32 input.
    assert count_parameters(create_model("lenet", in_channels=1, num_classes=10, image_size=32)) == 61_706


def test_lenet_rejects_tiny_images():
    with pytest.raises(ValueError, match="image_size >= 16"):
        create_model("lenet", in_channels=1, num_classes=10, image_size=12)


def test_resnet_is_resnet20():
    kw = {"in_channels": 3, "num_classes": 10, "image_size": 32}
    assert (
        count_parameters(create_model("resnet", **kw))
        == count_parameters(create_model("resnet20", **kw))
        == 272_474
    )


@pytest.mark.parametrize("student", ["slim_resnet", "mobilenet_tiny"])
def test_students_are_small(student):
    kw = {"in_channels": 3, "num_classes": 10, "image_size": 32}
    assert count_parameters(create_model(student, **kw)) < count_parameters(create_model("resnet18", **kw)) / 10


def test_builder_kwargs_are_passed_through():
    small = create_model(
        "slim_resnet", in_channels=3, num_classes=10, image_size=32, widths=(4, 8), depths=(1, 1)
    )
    assert count_parameters(small) < count_parameters(
        create_model("slim_resnet", in_channels=3, num_classes=10, image_size=32)
    )


def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError, match="unknown model 'vgg'") as err:
        create_model("vgg", in_channels=3, num_classes=10, image_size=32)
    for name in list_models():
        assert name in str(err.value)


def test_duplicate_registration_is_refused():
    def lenet(**kwargs):
        raise AssertionError("must not be registered")

    with pytest.raises(ValueError, match="already registered"):
        register_model(lenet)
    assert isinstance(create_model("lenet", in_channels=1, num_classes=10, image_size=32), nn.Module)


@pytest.mark.parametrize("student, teacher", sorted(NARROWS.items()))
def test_a_narrowed_student_computes_what_the_teacher_computes_with_only_its_strongest_channels(student, teacher):
    """Silence every channel of the teacher but the ones the student keeps (zero every weight and bias that
    produces them, so they are 0 everywhere): the teacher then computes exactly what the narrowed student does."""
    torch.manual_seed(0)
    wide = create_model(teacher, in_channels=1, num_classes=11, image_size=32)
    narrow = create_model(student, in_channels=1, num_classes=11, image_size=32)
    target, state = narrow.state_dict(), wide.state_dict()
    for group in wide.channel_groups():
        bn = wide.get_submodule(group.score)
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5).mul_(torch.randint(0, 2, bn.weight.shape) * 2 - 1)  # strong, either sign
            bn.bias.uniform_(-0.5, 0.5)
        key, dim = group.members[0]
        weak = torch.randperm(bn.num_features)[target[key].shape[dim]:]
        for key, dim in group.members:
            if dim == 0 and not key.endswith(("running_mean", "running_var")):
                state[key][weak] = 0  # the state dict's tensors are the parameters themselves
    narrow_into(wide, narrow)
    x = torch.randn(4, 1, 32, 32)
    torch.testing.assert_close(narrow.eval()(x), wide.eval()(x), rtol=1e-5, atol=1e-5)
    assert count_parameters(narrow) < count_parameters(wide) / 3


def test_narrowing_refuses_networks_of_another_design():
    with pytest.raises(ValueError, match="does not list its channel groups"):
        narrow_into(create_model("resnet20", in_channels=1, num_classes=10, image_size=32),
                    create_model("slim_resnet", in_channels=1, num_classes=10, image_size=32))
    with pytest.raises(ValueError, match="not the same design"):
        narrow_into(create_model("unet", in_channels=1, num_classes=11, image_size=32),
                    create_model("unet_small", in_channels=3, num_classes=11, image_size=32))


@pytest.mark.parametrize("channels", [8, 32])
def test_batch_norm_on_a_channels_last_input_computes_what_torchs_does(channels):
    """layers.BatchNorm2d runs few channels in the contiguous layout (speed): the same outputs, gradients and stats."""
    from visionops.models.layers import BatchNorm2d

    torch.manual_seed(0)
    x = torch.randn(4, channels, 16, 16).contiguous(memory_format=torch.channels_last)
    ours, theirs = BatchNorm2d(channels), nn.BatchNorm2d(channels)
    theirs.load_state_dict(ours.state_dict())
    outputs = []
    for bn in (ours, theirs):
        xi = x.clone().requires_grad_(True)
        y = bn(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outputs.append((y, xi.grad, bn.weight.grad, bn.running_mean, bn.running_var))
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b)
