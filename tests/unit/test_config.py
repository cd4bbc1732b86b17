"""Config loading: presets, overrides with type conversion, one-line errors for user mistakes."""

import subprocess
import sys

import pytest

from megatron_r1.config import CONF_DIR, ConfigError, StageConfig, load_config, to_dict


def test_defaults_validate_and_serialise():
    cfg = load_config(None)
    assert isinstance(cfg, StageConfig)
    assert to_dict(cfg)["model"]["hidden_size"] == cfg.model.hidden_size


def test_override_converts_types():
    cfg = load_config(None, ["model.hidden_size=256", "optimizer.lr=3e-4", "grpo.dynamic_sampling=true", "rollout.stop=[a, b]"])
    assert cfg.model.hidden_size == 256
    assert cfg.optimizer.lr == pytest.approx(3e-4) and isinstance(cfg.optimizer.lr, float)
    assert cfg.grpo.dynamic_sampling is True
    assert cfg.rollout.stop == ["a", "b"]


def test_int_is_accepted_for_float_field():
    assert load_config(None, ["optimizer.lr=1"]).optimizer.lr == 1.0


def test_unknown_key_names_the_key_and_closest_valid_ones():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.hiden_size=3"])
    msg = str(err.value)
    assert "model.hiden_size" in msg and "hidden_size" in msg and "\n" not in msg


def test_unknown_section():
    with pytest.raises(ConfigError, match="unknown config key 'modle'.*model"):
        load_config(None, ["modle.hidden_size=3"])


def test_wrong_type_names_field_and_expected_type():
    with pytest.raises(ConfigError, match=r"model\.hidden_size: expected int, got 'big'"):
        load_config(None, ["model.hidden_size=big"])
    with pytest.raises(ConfigError, match="expected bool"):
        load_config(None, ["grpo.dynamic_sampling=3"])


def test_choice_validation():
    with pytest.raises(ConfigError, match="grpo.loss_agg='mean' is not one of"):
        load_config(None, ["grpo.loss_agg=mean"])


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")


def test_bad_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_preset_by_name_and_override_on_top(tmp_path):
    presets = sorted(p.stem for p in (CONF_DIR / "models").glob("*.yaml"))
    assert presets, "conf/models/ has presets"
    stage = tmp_path / "s.yaml"
    stage.write_text(f"model: {presets[0]}\n")
    base = load_config(stage)
    cfg = load_config(stage, ["model.num_layers=7"])
    assert cfg.model.num_layers == 7
    assert cfg.model.hidden_size == base.model.hidden_size


def test_unknown_preset_lists_known_ones(tmp_path):
    stage = tmp_path / "s.yaml"
    stage.write_text("model: no_such_model\n")
    with pytest.raises(ConfigError, match="no preset or file named 'no_such_model'"):
        load_config(stage)


@pytest.mark.parametrize("path", sorted(str(p) for p in CONF_DIR.rglob("*.yaml") if p.parent.name == "stages"))
def test_every_stage_config_loads(path):
    load_config(path)


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF_DIR / "models").glob("*.yaml")))
def test_every_model_preset_loads(name):
    load_config(None, [f"model.preset={name}"])


def test_cli_reports_config_errors_in_one_line():
    out = subprocess.run(
        [sys.executable, "-m", "megatron_r1.cli", "show-config", "conf/stages/r1_zero_tiny.yaml", "model.hiden_size=3"],
        capture_output=True,
        text=True,
        cwd=CONF_DIR.parent,
    )
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "hidden_size" in lines[0], out.stderr


@pytest.mark.parametrize("override,message", [
    ("data.template=r1zero", "data.template='r1zero' is not one of: r1_zero, plain"),
    ("reward.general_scorer=bogus", "reward.general_scorer='bogus' is not one of"),
    ("reward_model.template=chatml", "reward_model.template='chatml' is not one of"),
    ("rejection.rewrite=pretty", "rejection.rewrite='pretty' is not one of"),
    ("rollout.dtype=bf16", "rollout.dtype='bf16' is not one of: auto, float32, bfloat16, float16"),
    ("steps=-5", "steps=-5 must be >= 1"),
    ("rollout.temperature=-1", "rollout.temperature=-1 must be >= 0"),
    ("rollout.top_p=0", "rollout.top_p=0 must lie in (0, 1]"),
    ("rollout.min_response_tokens=97", "rollout.min_response_tokens=97 must lie in [0, rollout.max_response_tokens=96]"),
    ("rollout.n_samples_per_prompt=0", "rollout.n_samples_per_prompt=0 must be >= 1"),
    ("grpo.micro_batch_size=0", "grpo.micro_batch_size=0 must be >= 1"),
])
def test_bad_values_are_one_line_errors_when_the_config_loads(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_choice_lists_match_what_the_code_accepts():
    from megatron_r1.config import DataConfig, RewardModelConfig, SFTConfig, choices
    from megatron_r1.data.templates import TEMPLATES

    assert set(choices(DataConfig, "template")) == set(TEMPLATES)
    assert set(choices(RewardModelConfig, "template")) == set(choices(SFTConfig, "template")) == {"auto", "chat", *TEMPLATES}


def test_empty_config_file_is_refused(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    with pytest.raises(ConfigError, match="the file is empty"):
        load_config(empty, [])


def _choice_fields() -> list[str]:
    """Every `Literal[...]` field of every section, as `section.field`."""
    import dataclasses
    import typing

    from megatron_r1.config import StageConfig, choices

    out = []
    for section in dataclasses.fields(StageConfig):
        cls = typing.get_type_hints(StageConfig)[section.name]
        if not dataclasses.is_dataclass(cls):
            continue
        for f in dataclasses.fields(cls):
            try:
                choices(cls, f.name)
            except TypeError:
                continue
            out.append(f"{section.name}.{f.name}")
    return out


@pytest.mark.parametrize("field", _choice_fields())
def test_a_wrong_choice_is_a_one_line_error_listing_the_choices(field):
    import typing

    from megatron_r1.config import StageConfig, choices

    section, name = field.split(".")
    allowed = choices(typing.get_type_hints(StageConfig)[section], name)
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{field}=no_such_choice"])
    assert str(err.value) == f"{field}='no_such_choice' is not one of: {', '.join(str(c) for c in allowed)}"
    for value in allowed:  # and every listed value loads
        load_config(None, [f"{field}={'null' if value is None else value}"])


def test_there_are_choice_fields_to_check():
    assert {"data.template", "reward.general_scorer", "reward_model.template", "rejection.rewrite", "rollout.dtype"} <= set(_choice_fields())
