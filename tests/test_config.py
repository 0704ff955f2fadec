"""Config loading, overrides and validation messages."""

import pytest

from instaquant import config as C


def test_defaults_and_overrides():
    cfg = C.from_dict(
        {"recipe": "static", "quant": {"bits": [4]}},
        ["epochs=3", "data.limit=64", "quant.method=lsq"],
    )
    assert cfg.epochs == 3 and cfg.data.limit == 64 and cfg.quant.method == "lsq"
    assert cfg.optim.lr == 0.1 and isinstance(cfg.optim.lr, float)
    assert C.from_dict({}, ["optim.lr=1e-3"]).optim.lr == 1e-3  # YAML 1.1 reads this as a string


def test_config_files_load():
    from pathlib import Path

    files = sorted(Path(__file__).parent.parent.glob("configs/*.yaml"))
    assert len(files) >= 9
    for f in files:
        C.load(f)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=0.1"], "unknown config key 'optim.lrr'; allowed: optim.lr"),
        (["quant.bits=[3, 9]"], "9 is outside the allowed range 1..8"),
        (["quant.bits=[]"], "'quant.bits' is empty"),
        (["recipe=magic"], "allowed: ('fp', 'static', 'dynamic')"),
        (["epochs=two"], "'epochs': expected an integer"),
        (["data.batch_size"], "not of the form key=value"),
        (["quant.method=int8"], "'quant.method'"),
    ],
)
def test_bad_values_name_key_and_allowed(overrides, message):
    with pytest.raises(C.ConfigError) as info:
        C.from_dict({}, overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_static_needs_one_bit_width():
    with pytest.raises(C.ConfigError, match="recipe 'static' takes one bit-width"):
        C.from_dict({"recipe": "static", "quant": {"bits": [3, 4]}})


def test_save_and_reload_roundtrip(tmp_path):
    cfg = C.from_dict({}, ["quant.bits=[2, 3]", "budget.weight=0.5"])
    C.save(cfg, tmp_path / "c.yaml")
    assert C.load(tmp_path / "c.yaml") == cfg


def test_layer_bits_parse_from_the_command_line_and_need_recipe_static():
    cfg = C.from_dict(
        {"recipe": "static", "quant": {"bits": [3]}}, ["quant.layer_bits={layer3.*: 4}"]
    )
    assert cfg.quant.layer_bits == {"layer3.*": 4}
    with pytest.raises(C.ConfigError, match="'quant.layer_bits' sets bits per layer of a static"):
        C.from_dict({}, ["quant.layer_bits={layer3.*: 4}"])
    with pytest.raises(C.ConfigError, match=r"'quant.layer_bits\['layer3.\*'\]': 9 is outside"):
        C.from_dict(
            {"recipe": "static", "quant": {"bits": [3]}}, ["quant.layer_bits={layer3.*: 9}"]
        )
    with pytest.raises(C.ConfigError, match="'quant.layer_bits': expected a mapping"):
        C.from_dict({"recipe": "static", "quant": {"bits": [3]}}, ["quant.layer_bits=[4]"])
