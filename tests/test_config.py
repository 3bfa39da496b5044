import pytest
import yaml

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


def test_cross_field_rules():
    with pytest.raises(ParamsError, match="data.root"):
        parse_params({"data": {"source": "folder"}})
    with pytest.raises(ParamsError, match="balance.offline"):
        parse_params({"balance": {"offline": True, "strategy": "none"}})


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
