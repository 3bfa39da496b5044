import pytest
import yaml
from pydantic import BaseModel

from visionops.config import ParamsError, Params, load_params, parse_params

from conftest import ROOT


def test_shipped_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.data.source == "digits"
    assert params.validate_.max_imbalance_ratio >= 1


def test_defaults_fill_missing_sections():
    assert parse_params({}) == Params()


def test_typo_in_key_names_it_and_suggests():
    with pytest.raises(ParamsError) as err:
        parse_params({"data": {"imag_size": 32}})
    msg = str(err.value)
    assert "data.imag_size" in msg and "did you mean 'image_size'" in msg


def test_unknown_section_is_named():
    with pytest.raises(ParamsError, match="trian: unknown key"):
        parse_params({"trian": {}})


def test_out_of_range_value_names_key_and_value():
    with pytest.raises(ParamsError) as err:
        parse_params({"data": {"image_size": -3}})
    assert "data.image_size" in str(err.value) and "-3" in str(err.value)


def test_wrong_type_and_bad_choice():
    with pytest.raises(ParamsError, match="balance.strategy"):
        parse_params({"balance": {"strategy": "smote"}})
    with pytest.raises(ParamsError, match="augment.hflip"):
        parse_params({"augment": {"hflip": "sometimes"}})


@pytest.mark.parametrize("key", ["amp", "channels_last"])
def test_speed_switches_take_true_false_and_always(key):
    import torch

    from visionops.training.device import autocast, memory_format

    cpu = torch.device("cpu")
    assert getattr(parse_params({"train": {key: True}}).train, key) == "cuda"
    assert getattr(parse_params({"train": {key: False}}).train, key) == "off"
    assert getattr(parse_params({"train": {key: "always"}}).train, key) == "always"
    with pytest.raises(ParamsError, match=f"train.{key}"):
        parse_params({"train": {key: "sometimes"}})
    assert memory_format(cpu, "cuda") == memory_format(cpu, "off") == torch.contiguous_format
    assert memory_format(cpu, "always") == torch.channels_last
    layer = torch.nn.Linear(2, 2)
    with autocast(cpu, "cuda"):
        assert layer(torch.ones(1, 2)).dtype == torch.float32
    with autocast(cpu, "always"):
        assert layer(torch.ones(1, 2)).dtype == torch.bfloat16


def test_cross_field_rules():
    with pytest.raises(ParamsError, match="data.root"):
        parse_params({"data": {"source": "folder"}})
    with pytest.raises(ParamsError, match="balance.offline"):
        parse_params({"balance": {"offline": True, "strategy": "none"}})


def test_augment_keys_of_another_task_are_refused_naming_the_key():
    dense = {"task": "segmentation", "data": {"source": "canvases"}, "train": {"model": "unet"},
             "distill": {"student": "unet_small"}}
    with pytest.raises(ParamsError, match="augment.crop_padding applies to classification only"):
        parse_params({**dense, "augment": {"crop_padding": 4}})
    with pytest.raises(ParamsError, match="augment.translate applies to detection and segmentation only"):
        parse_params({"augment": {"translate": 0.1}})
    assert parse_params({**dense, "augment": {"translate": 0.0625}}).augment.translate == 0.0625


def test_progressive_resizing_is_for_segmentation_and_ends_at_full_size():
    with pytest.raises(ParamsError, match="train.progressive_start applies to segmentation only"):
        parse_params({"train": {"progressive_start": 0.5, "progressive_epochs": 2}})
    seg = {"task": "segmentation", "data": {"source": "canvases"}, "distill": {"student": "unet_small"}}
    with pytest.raises(ParamsError, match=r"train.progressive_epochs \(7\) must be below train.epochs \(7\)"):
        parse_params({**seg, "train": {"model": "unet", "epochs": 7, "progressive_start": 0.5, "progressive_epochs": 7}})
    assert parse_params({**seg, "train": {"model": "unet", "epochs": 7, "progressive_start": 0.5, "progressive_epochs": 4}})


def test_a_student_starts_from_the_teacher_only_where_it_is_the_teachers_network_narrowed():
    seg = {"task": "segmentation", "data": {"source": "canvases"}, "train": {"model": "unet"}}
    assert parse_params({**seg, "distill": {"student": "unet_small", "init": "teacher"}}).distill.init == "teacher"
    with pytest.raises(ParamsError, match=r"distill.init: 'teacher' needs .* unet -> lraspp_mobilenet_v3_large is not one"):
        parse_params({**seg, "distill": {"student": "lraspp_mobilenet_v3_large", "init": "teacher"}})
    with pytest.raises(ParamsError, match="distill.init: 'teacher' needs .* lenet -> slim_resnet is not one"):
        parse_params({"distill": {"init": "teacher"}})
    with pytest.raises(ParamsError, match="distill.init"):
        parse_params({"distill": {"init": "pretrained"}})


def test_file_errors(tmp_path):
    with pytest.raises(ParamsError, match="no such file"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    bad.write_text(yaml.safe_dump(["a", "list"]))
    with pytest.raises(ParamsError, match="must be a mapping"):
        load_params(bad)


@pytest.mark.parametrize("section,key", [("train", "model"), ("distill", "student")])
def test_unknown_model_name_names_the_key_and_lists_the_models(section, key):
    with pytest.raises(ParamsError) as err:
        parse_params({section: {key: "resnt20"}})
    msg = str(err.value)
    assert f"{section}.{key}: unknown model 'resnt20' (did you mean 'resnet20'?)" in msg
    assert "valid models: " in msg and "fastnet, fastnet_tiny, lenet" in msg


def test_check_rejects_an_unknown_model_without_importing_torch(tmp_path):
    import subprocess
    import sys

    params = tmp_path / "params.yaml"
    params.write_text("train:\n  model: resnt20\n")
    code = (
        "import sys; from visionops.cli import main; rc = main(['check', '--params', sys.argv[1]]); "
        "assert 'torch' not in sys.modules, 'check imported torch'; sys.exit(rc)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(params)], capture_output=True, text=True)
    assert out.returncode == 1, out.stderr
    assert "train.model: unknown model 'resnt20'" in out.stderr and "Traceback" not in out.stderr


def test_model_names_known_to_the_schema_are_the_registry():
    from visionops.model_names import MODEL_NAMES
    from visionops.models import list_models

    assert MODEL_NAMES == tuple(list_models())


def _schema_keys(model, prefix=""):
    keys = set()
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        sub = field.annotation
        keys |= _schema_keys(sub, key + ".") if isinstance(sub, type) and issubclass(sub, BaseModel) else {key}
    return keys


def _yaml_keys(raw, model, prefix=""):
    keys = set()
    for key, value in raw.items():
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == key), None)
        sub = field.annotation if field is not None else None
        nested = isinstance(sub, type) and issubclass(sub, BaseModel) and isinstance(value, dict)
        keys |= _yaml_keys(value, sub, f"{prefix}{key}.") if nested else {prefix + key}
    return keys


def test_params_yaml_and_the_schema_name_the_same_keys():
    """params.yaml sets every setting of the default run; the schema's defaults are what an empty section gives."""
    shipped = _yaml_keys(yaml.safe_load((ROOT / "params.yaml").read_text()), Params)
    schema = _schema_keys(Params)
    assert not shipped - schema, f"params.yaml keys the schema does not know: {sorted(shipped - schema)}"
    assert not schema - shipped, f"schema keys params.yaml does not mention: {sorted(schema - shipped)}"


@pytest.mark.parametrize("preset", ["detection.yaml", "segmentation.yaml"])
def test_each_task_preset_is_valid_and_sets_every_setting_of_its_task(preset):
    """A task's preset is a complete params.yaml (DVC wants every section a stage lists, whatever the task)."""
    raw = yaml.safe_load((ROOT / "presets" / preset).read_text())
    assert parse_params(raw, origin=preset).task == preset.removesuffix(".yaml")
    shipped = _yaml_keys(raw, Params)
    wanted = _schema_keys(Params)
    assert not shipped - wanted, f"{preset} keys it should not have: {sorted(shipped - wanted)}"
    assert not wanted - shipped, f"{preset} does not mention: {sorted(wanted - shipped)}"


def test_a_model_too_big_for_the_images_is_rejected_naming_both_keys():
    with pytest.raises(ParamsError) as err:
        parse_params({"data": {"image_size": 8}, "train": {"model": "lenet"}, "distill": {"student": "fastnet"}})
    msg = str(err.value)
    assert "train.model: lenet needs data.image_size >= 16, got 8" in msg
    assert "(top level)" not in msg
    parse_params({"data": {"image_size": 16}, "train": {"model": "lenet"}})


def test_min_image_sizes_are_what_the_models_build_at():
    import torch

    from visionops.model_names import MIN_IMAGE_SIZE, models_for
    from visionops.models import create_model

    floor = Params.model_fields["data"].annotation.model_fields["image_size"].metadata[0].ge
    for name in models_for("classification"):  # (N, classes) logits; other tasks' outputs are tested with them
        size = MIN_IMAGE_SIZE.get(name, floor)
        net = create_model(name, in_channels=3, num_classes=4, image_size=size).eval()
        assert net(torch.rand(2, 3, size, size)).shape == (2, 4), name
        if size > floor:
            with pytest.raises((ValueError, RuntimeError)):
                create_model(name, in_channels=3, num_classes=4, image_size=size - 1).eval()(torch.rand(2, 3, size - 1, size - 1))
