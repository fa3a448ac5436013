"""`STRConfig`: defaults, sources (dict, YAML, JSON, Axolotl `str:` block), JSON round-trip, and errors
that name the field and the bad value."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers.factory import make_model
from pydantic import BaseModel, ValidationError

from str_hooks.errors import STRConfigError
from str_hooks.schemas.config import (
    LoggingConfig,
    PenaltyConfig,
    ProbeConfig,
    ReferenceConfig,
    STRConfig,
    TokensConfig,
    load_config,
)

NON_DEFAULT: list[dict[str, Any]] = [
    {"coef": 0.25, "warmup_steps": 10, "verify_projection": False},
    {"tokens": {"method": "list", "strings": ["Sorry", " cannot", 42], "k": 3}},
    {"tokens": {"method": "contrastive", "k": 8, "templates": "refusals.txt"}},
    {"tokens": {"path": "tokens.json"}},
    {
        "penalty": {"form": "hinge", "margin": 0.5, "positions": "first_n", "first_n": 4},
        "reference": {"source": "adapter"},
    },
    {
        "penalty": {"form": "logprob", "positions": "all", "on_nonfinite": "skip"},
        "reference": {"source": "model"},
    },
    {"reference": {"source": "adapter"}},
    {"reference": {"source": "model", "model_path": "/models/aligned"}},
    {"reference": {"source": "cache", "cache_path": "ref.safetensors"}, "penalty": {"form": "hinge"}},
    {
        "reference": {"source": "anchors", "anchor_tokens": 1, "benign_weight": 0.0},
        "penalty": {"form": "mse"},
    },
    {
        "reference": {
            "source": "anchors",
            "anchors_path": "anchors.csv",
            "anchors_column": "goal",
            "anchor_batch_size": 2,
            "anchor_every": 5,
        }
    },
    {"logging": {"prefix": "safety/", "top_tokens": 0}},
]

SECTIONS: dict[str, type[BaseModel]] = {
    "tokens": TokensConfig,
    "penalty": PenaltyConfig,
    "reference": ReferenceConfig,
    "logging": LoggingConfig,
}

EXAMPLE = {
    "coef": 0.3,
    "tokens": {"method": "list", "strings": ["Sorry", "cannot"]},
    "penalty": {"form": "hinge", "margin": 0.2},
    "reference": {"source": "model", "model_path": "aligned"},
}


def assert_example(cfg: STRConfig) -> None:
    assert cfg.coef == 0.3
    assert cfg.tokens.method == "list" and cfg.tokens.strings == ["Sorry", "cannot"]
    assert cfg.penalty.form == "hinge" and cfg.penalty.margin == 0.2
    assert cfg.reference.source == "model" and cfg.reference.model_path == "aligned"
    assert cfg.logging == LoggingConfig()


def test_defaults() -> None:
    # kl at anchors with 4-token openings and benign anchors (results/decision), coef 30 (results/harmful_mixing).
    cfg = STRConfig()
    assert (cfg.coef, cfg.warmup_steps, cfg.verify_projection) == (30.0, 0, True)
    assert cfg.tokens.model_dump() == {
        "method": "frequency",
        "k": 32,
        "templates": None,
        "strings": None,
        "path": None,
    }
    assert cfg.penalty.model_dump() == {
        "form": "kl",
        "margin": 0.0,
        "positions": "supervised",
        "first_n": 1,
        "min_reference_mass": None,
        "head_gradient": True,
        "on_nonfinite": "raise",
    }
    assert cfg.reference.model_dump() == {
        "source": "anchors",
        "model_path": None,
        "cache_path": None,
        "anchors_path": None,
        "anchors_column": None,
        "anchor_batch_size": 2,
        "rows": None,
        "screen_mass": None,
        "audit_share": 0.125,
        "anchor_every": 1,
        "anchor_placement": "separate",
        "share_anchor_prefix": "auto",
        "fold_into_padding": "auto",
        "anchor_tokens": 4,
        "benign_weight": 1.0,
        "benign_anchors_path": None,
    }
    assert cfg.logging.model_dump() == {"prefix": "str/", "top_tokens": 3}
    assert STRConfig.model_validate({}) == cfg
    assert load_config({}) == cfg


@pytest.mark.parametrize("source", ["adapter", "model", "cache"])
def test_default_form_is_mse_away_from_anchors(source: str) -> None:
    # kl was chosen for anchors; the training-position sources were studied with mse, and `cache` takes no
    # full-vocabulary form, so an unset form there must not become an error.
    extra = {"cache_path": "ref.safetensors"} if source == "cache" else {}
    cfg = STRConfig.model_validate({"reference": {"source": source, **extra}})
    assert cfg.penalty.form == "mse"
    assert STRConfig.model_validate_json(cfg.model_dump_json()) == cfg
    explicit = STRConfig.model_validate({"reference": {"source": "adapter"}, "penalty": {"form": "kl"}})
    assert explicit.penalty.form == "kl"
    assert STRConfig.model_validate({"penalty": {"margin": 0.0}}).penalty.form == "kl"


def test_model_validate_from_dict() -> None:
    cfg = STRConfig.model_validate(EXAMPLE)
    assert_example(cfg)
    assert load_config(EXAMPLE) == cfg
    assert load_config(cfg) is cfg


def test_load_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "str.yaml"
    path.write_text(yaml.safe_dump(EXAMPLE), encoding="utf-8")
    assert_example(load_config(path))
    assert load_config(str(path)) == STRConfig.model_validate(EXAMPLE)


def test_load_json_file(tmp_path: Path) -> None:
    path = tmp_path / "str.json"
    path.write_text(json.dumps(EXAMPLE), encoding="utf-8")
    assert_example(load_config(path))


def test_load_yaml_with_top_level_str_block(tmp_path: Path) -> None:
    only = tmp_path / "only.yml"
    only.write_text(yaml.safe_dump({"str": EXAMPLE}), encoding="utf-8")
    assert_example(load_config(only))
    # An Axolotl document: the trainer's own keys beside the `str:` block.
    axolotl = tmp_path / "axolotl.yml"
    axolotl.write_text(
        "base_model: ./aligned\nadapter: lora\nlora_r: 16\nmicro_batch_size: 2\n"
        + yaml.safe_dump({"str": EXAMPLE}),
        encoding="utf-8",
    )
    assert_example(load_config(axolotl))


@pytest.mark.parametrize("data", [{}, *NON_DEFAULT], ids=lambda d: json.dumps(d)[:40])
def test_json_round_trip(data: dict[str, Any]) -> None:
    cfg = STRConfig.model_validate(data)
    if data:
        assert cfg != STRConfig()
    dumped = cfg.model_dump_json()
    again = STRConfig.model_validate_json(dumped)
    assert again == cfg
    assert again.model_dump() == cfg.model_dump()
    assert STRConfig.model_validate(json.loads(dumped)) == cfg


def test_every_field_has_a_description() -> None:
    found = {name for name, f in STRConfig.model_fields.items() if f.annotation in SECTIONS.values()}
    assert found == set(SECTIONS), "a new section must be listed here"
    models: list[type[BaseModel]] = [STRConfig, *SECTIONS.values()]
    for model in models:
        assert model.model_fields
        for name, field in model.model_fields.items():
            assert field.description and len(field.description.strip()) >= 8, f"{model.__name__}.{name}"


def config_error(data: dict[str, Any], pattern: str) -> str:
    with pytest.raises(STRConfigError, match=pattern) as info:
        STRConfig.model_validate(data)
    return str(info.value)


def test_unknown_top_level_key_with_hint() -> None:
    message = config_error({"coeff": 0.5}, r"unknown key `coeff` \(value 0\.5\) in STRConfig\.")
    assert "Did you mean `coef`?" in message


def test_unknown_key_without_a_close_match_lists_the_known_ones() -> None:
    message = config_error({"zzzzzz": 1}, r"unknown key `zzzzzz` \(value 1\)")
    assert "Did you mean" not in message
    assert (
        "Known keys: coef, logging, penalty, probe, reference, tokens, verify_projection, warmup_steps"
        in message
    )


def test_unknown_nested_key() -> None:
    message = config_error(
        {"penalty": {"fomr": "hinge"}}, r"unknown key `fomr` \(value 'hinge'\) in PenaltyConfig"
    )
    assert "Did you mean `form`?" in message
    assert re.search(r"^penalty$", message, re.MULTILINE), message


@pytest.mark.parametrize("coef", [-0.1, float("nan"), float("inf"), float("-inf")])
def test_coef_must_be_finite_and_non_negative(coef: float) -> None:
    config_error({"coef": coef}, rf"`coef` must be a finite number >= 0, got {re.escape(str(coef))}")


@pytest.mark.parametrize("k", [0, -5])
def test_k_must_be_positive(k: int) -> None:
    config_error({"tokens": {"k": k}}, rf"`tokens\.k` must be >= 1, got {k}")


def test_bad_form_literal() -> None:
    message = config_error({"penalty": {"form": "l2"}}, r"penalty\.form\n\s+Input should be 'mse'")
    assert "input_value='l2'" in message


def test_negative_margin() -> None:
    config_error({"penalty": {"form": "hinge", "margin": -0.5}}, r"`penalty\.margin` must be >= 0, got -0\.5")


def test_margin_with_form_mse() -> None:
    config_error(
        {"penalty": {"form": "mse", "margin": 0.5}},
        r"`penalty\.margin` is 0\.5 but `penalty\.form` is 'mse'",
    )


def test_first_n_with_positions_supervised() -> None:
    config_error(
        {"penalty": {"first_n": 3}}, r"`penalty\.first_n` is 3 but `penalty\.positions` is 'supervised'"
    )


def test_first_n_must_be_positive() -> None:
    config_error(
        {"penalty": {"positions": "first_n", "first_n": 0}}, r"`penalty\.first_n` must be >= 1, got 0"
    )


@pytest.mark.parametrize("gate", [0.0, -0.1, 1.5])
def test_min_reference_mass_must_be_a_probability(gate: float) -> None:
    config_error(
        {"penalty": {"form": "kl", "min_reference_mass": gate}, "reference": {"source": "adapter"}},
        rf"`penalty\.min_reference_mass` must be in \(0, 1\], got {re.escape(str(gate))}",
    )


def test_min_reference_mass_needs_a_coarse_form() -> None:
    config_error(
        {"penalty": {"form": "mse", "min_reference_mass": 0.5}, "reference": {"source": "adapter"}},
        r"`penalty\.min_reference_mass` is 0\.5 but `penalty\.form` is 'mse'.*set form: kl",
    )


def test_min_reference_mass_needs_a_training_position_reference() -> None:
    # Source `cache` keeps k logits per position (forms mse/hinge only), so its error comes first.
    config_error(
        {"penalty": {"form": "logprob", "min_reference_mass": 0.5}},
        r"`penalty\.min_reference_mass` is set \(0\.5\) but `reference\.source` is 'anchors'",
    )


def test_min_reference_mass_is_accepted_where_it_applies() -> None:
    cfg = STRConfig.model_validate(
        {"penalty": {"form": "kl", "min_reference_mass": 0.5}, "reference": {"source": "model"}}
    )
    assert cfg.penalty.min_reference_mass == 0.5


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"reference": {"rows": "adapter", "screen_mass": 0.0}},
            r"`reference\.screen_mass` must be in \(0, 1\], got 0\.0",
        ),
        (
            {"reference": {"rows": "adapter", "screen_mass": 0.05, "audit_share": 1.5}},
            r"`reference\.audit_share` must be in \(0, 1\], got 1\.5",
        ),
        (
            {"reference": {"rows": "adapter", "audit_share": 0.5}},
            r"`reference\.audit_share` is set \(0\.5\) but `reference\.screen_mass` is not.*set screen_mass",
        ),
        (
            {"reference": {"screen_mass": 0.05}},
            r"`reference\.screen_mass` is set \(0\.05\) but `reference\.source` is 'anchors'.*set source: adapter",
        ),
        (
            {"reference": {"source": "adapter", "screen_mass": 0.05}},
            r"`reference\.screen_mass` is set \(0\.05\) but `penalty\.form` is 'mse'.*set form: kl",
        ),
    ],
)
def test_screen_settings_are_checked(settings: dict[str, Any], message: str) -> None:
    config_error(settings, message)


def test_screen_is_accepted_where_it_applies() -> None:
    cfg = STRConfig.model_validate(
        {"reference": {"rows": "adapter", "screen_mass": 0.05, "audit_share": 0.25}}
    )
    assert (cfg.reference.screen_mass, cfg.reference.audit_share) == (0.05, 0.25)
    # A dump (every field, defaults included) loads back to the same config.
    assert STRConfig.model_validate_json(cfg.model_dump_json()) == cfg
    plain = STRConfig.model_validate({"reference": {"source": "adapter"}})
    assert STRConfig.model_validate_json(plain.model_dump_json()) == plain


def test_cache_source_without_cache_path() -> None:
    config_error(
        {"reference": {"source": "cache"}},
        r"`reference\.source` is 'cache' but `reference\.cache_path` is not set",
    )


def test_cache_path_with_another_source() -> None:
    config_error(
        {"reference": {"source": "model", "cache_path": "ref.safetensors"}},
        r"`reference\.cache_path` is set \('ref\.safetensors'\) but `reference\.source` is 'model'",
    )


def test_model_path_with_another_source() -> None:
    config_error(
        {"reference": {"model_path": "/models/aligned"}},
        r"`reference\.model_path` is set \('/models/aligned'\) but `reference\.source` is 'anchors'",
    )


@pytest.mark.parametrize("form", ["logprob", "kl"])
def test_coarse_forms_need_full_vocabulary_reference(form: str) -> None:
    config_error(
        {"penalty": {"form": form}, "reference": {"source": "cache", "cache_path": "ref.safetensors"}},
        rf"`penalty\.form` '{form}' needs full-vocabulary reference logits, which `reference\.source` 'cache'",
    )
    for source in ("anchors", "adapter"):
        assert STRConfig.model_validate({"penalty": {"form": form}, "reference": {"source": source}})


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("anchors_path", "anchors.txt"),
        ("anchors_column", "goal"),
        ("anchor_batch_size", 4),
        ("anchor_every", 10),
        ("anchor_placement", "folded"),
    ],
)
def test_anchor_options_with_source_adapter(option: str, value: Any) -> None:
    config_error(
        {"reference": {"source": "adapter", option: value}},
        rf"`reference\.{option}` is set \({re.escape(repr(value))}\) but `reference\.source` is 'adapter'",
    )


def test_unknown_anchor_placement() -> None:
    config_error(
        {"reference": {"source": "anchors", "anchor_placement": "inline"}},
        r"anchor_placement",
    )


def test_probe_on_the_default_anchors_warns() -> None:
    cfg = {"reference": {"source": "anchors"}, "probe": {"every": 5}}
    with pytest.warns(UserWarning, match=r"`refusal_rate` is not a held-out measure"):
        STRConfig.model_validate(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        STRConfig.model_validate({**cfg, "probe": {"every": 5, "prompts_path": "heldout.txt"}})
        STRConfig.model_validate({**cfg, "reference": {"source": "anchors", "anchors_path": "mine.txt"}})


def test_positions_with_source_anchors() -> None:
    config_error(
        {"reference": {"source": "anchors"}, "penalty": {"positions": "all"}},
        r"`penalty\.positions` is set \('all'\) but `reference\.source` is 'anchors'",
    )


def test_method_list_without_strings() -> None:
    config_error({"tokens": {"method": "list"}}, r"`tokens\.method` is 'list' but `tokens\.strings` is empty")
    assert STRConfig.model_validate({"tokens": {"method": "list", "path": "t.json"}}).tokens.path == "t.json"


def test_strings_with_method_frequency() -> None:
    config_error(
        {"tokens": {"method": "frequency", "strings": ["Sorry"]}},
        r"`tokens\.strings` is set \(\['Sorry'\]\) but `tokens\.method` is 'frequency'",
    )


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"warmup_steps": -1}, r"`warmup_steps` must be >= 0, got -1"),
        ({"logging": {"top_tokens": -2}}, r"`logging\.top_tokens` must be >= 0, got -2"),
        (
            {"reference": {"source": "anchors", "anchor_batch_size": 0}},
            r"`reference\.anchor_batch_size` must be >= 1, got 0",
        ),
        (
            {"reference": {"source": "anchors", "anchor_every": 0}},
            r"`reference\.anchor_every` must be >= 1, got 0",
        ),
        (
            {"reference": {"source": "disk"}},
            r"reference\.source\n\s+Input should be 'adapter'.*input_value='disk'",
        ),
    ],
)
def test_other_range_errors(data: dict[str, Any], pattern: str) -> None:
    config_error(data, pattern)


def test_assignment_is_validated() -> None:
    # Only the error is checked: pydantic keeps the rejected value after an `after` model validator
    # fails on assignment (pydantic/pydantic#7105).
    with pytest.raises(STRConfigError, match=r"`penalty\.margin` must be >= 0, got -1\.0"):
        STRConfig().penalty.margin = -1.0
    with pytest.raises(STRConfigError, match=r"`tokens\.k` must be >= 1, got 0"):
        STRConfig().tokens.k = 0
    with pytest.raises(STRConfigError, match=r"`coef` must be a finite number >= 0, got -1"):
        STRConfig().coef = -1


def test_direct_construction_raises_config_error() -> None:
    # One error type for one condition: built directly, as through `load_config` or an entry point.
    with pytest.raises(STRConfigError, match=r"`coef` must be a finite number >= 0, got -1\.0") as info:
        STRConfig(coef=-1)
    assert "input_value={'coef': -1}" in str(info.value)
    with pytest.raises(
        STRConfigError, match=r"(?m)^coef\n\s+Input should be a valid number.*input_value='x'"
    ):
        STRConfig(coef="x")
    with pytest.raises(STRConfigError, match=r"(?m)^reference\.source\n\s+Input should be 'adapter'"):
        STRConfig.model_validate_json('{"reference": {"source": "disk"}}')
    with pytest.raises(STRConfigError, match=r"unknown key `coeff` \(value '0\.5'\) in STRConfig"):
        STRConfig.model_validate_strings({"coeff": "0.5"})


# One invalid value per section, built directly: each raises the same error type as the whole config.
SECTION_ERRORS: list[tuple[type[BaseModel], dict[str, Any], str]] = [
    (TokensConfig, {"k": 0}, r"`tokens\.k` must be >= 1, got 0"),
    (PenaltyConfig, {"form": "hinge", "margin": -1.0}, r"`penalty\.margin` must be >= 0, got -1\.0"),
    (ReferenceConfig, {"source": "cache"}, r"`reference\.source` is 'cache' but `reference\.cache_path`"),
    (ProbeConfig, {"every": -1}, r"`probe\.every` must be >= 0, got -1"),
    (LoggingConfig, {"top_tokens": -1}, r"`logging\.top_tokens` must be >= 0, got -1"),
]


@pytest.mark.parametrize(
    ("section", "data", "pattern"), SECTION_ERRORS, ids=lambda v: getattr(v, "__name__", "")
)
def test_section_built_directly_raises_config_error(
    section: type[BaseModel], data: dict[str, Any], pattern: str
) -> None:
    with pytest.raises(STRConfigError, match=pattern):
        section(**data)
    with pytest.raises(STRConfigError, match=pattern):
        section.model_validate(data)
    with pytest.raises(STRConfigError, match=pattern):
        section.model_validate_json(json.dumps(data))
    with pytest.raises(STRConfigError, match=r"unknown key `nope`"):
        section(nope=1)


def test_config_error_is_still_pydantic_validation_error() -> None:
    # Code written when direct construction raised pydantic's type (`except ValidationError`, `errors()`;
    # the Axolotl check reads them) keeps working: same errors, same message.
    with pytest.raises(ValidationError) as info:
        STRConfig.model_validate({"tokens": {"k": 0}, "reference": {"source": "disk"}})
    assert isinstance(info.value, STRConfigError)
    assert info.value.title == "STRConfig"
    errors = info.value.errors()
    assert [error["loc"] for error in errors] == [("tokens",), ("reference", "source")]
    assert errors[0]["msg"].startswith("Value error, `tokens.k` must be >= 1, got 0")
    assert errors[1]["type"] == "literal_error" and errors[1]["input"] == "disk"


def test_nested_config_errors_stay_field_errors() -> None:
    # Inside another model (like Axolotl's `STRArgs`), the config is validated as a field: its errors reach
    # the outer model with their place, and the outer model raises its own (pydantic's) error type.
    class Outer(BaseModel):
        str_block: STRConfig

    with pytest.raises(ValidationError) as info:
        Outer.model_validate({"str_block": {"penalty": {"form": "l2"}}})
    assert not isinstance(info.value, STRConfigError)
    assert [error["loc"] for error in info.value.errors()] == [("str_block", "penalty", "form")]


def test_malformed_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("coef: [0.1\npenalty: {form: mse\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.yaml.* is not valid YAML") as info:
        load_config(path)
    assert not isinstance(info.value, ValidationError)


def test_malformed_json_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"coef": 0.1,', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.json.* is not valid JSON") as info:
        load_config(path)
    assert not isinstance(info.value, ValidationError)


@pytest.mark.parametrize(
    ("content", "kind"), [("- coef: 0.1\n- coef: 0.2\n", "list"), ("just text\n", "str")]
)
def test_yaml_file_that_is_not_a_mapping(tmp_path: Path, content: str, kind: str) -> None:
    path = tmp_path / "list.yaml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=rf"list\.yaml.* must hold a mapping of options, got {kind}"):
        load_config(path)


def test_file_with_bad_value_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "str.yaml"
    path.write_text("str:\n  coef: -2\n", encoding="utf-8")
    with pytest.raises(
        STRConfigError, match=r"(?s)str\.yaml.*`coef` must be a finite number >= 0, got -2"
    ) as info:
        load_config(path)
    assert isinstance(info.value.__cause__, ValidationError)  # pydantic's error, message kept


def test_every_entry_point_raises_the_same_config_error(tokens: Any) -> None:
    from str_hooks import register_str_hook
    from str_hooks.integrations.hf import STRCallback as HFCallback
    from str_hooks.integrations.lightning import STRCallback as LightningCallback

    bad = {"coeff": 0.5}
    entry_points: list[Any] = [
        load_config,
        lambda c: register_str_hook(make_model("llama"), c, tokens=tokens),
        HFCallback,
        lambda c: LightningCallback(c, tokens=tokens),
    ]
    for build in entry_points:
        with pytest.raises(STRConfigError, match=r"(?s)unknown key `coeff`.*Did you mean `coef`\?"):
            build(bad)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.yaml.* does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_probe_options_need_the_probe_on() -> None:
    config_error({"probe": {"n_prompts": 4}}, r"`probe.n_prompts` is set \(4\) but `probe.every` is 0")
    config_error({"probe": {"every": -1}}, r"`probe.every` must be >= 0, got -1")
    config_error({"probe": {"every": 5, "phrases": [" "]}}, r"`probe.phrases` is empty")
    cfg = STRConfig.model_validate({"probe": {"every": 5, "n_prompts": 4}})
    assert STRConfig.model_validate_json(cfg.model_dump_json()) == cfg


def test_docs_config_md_is_generated_from_the_schema() -> None:
    from str_hooks.schemas.docs import render

    committed = (Path(__file__).parent.parent / "docs" / "config.md").read_text(encoding="utf-8")
    assert committed == render(), "regenerate: python -m str_hooks.schemas.docs > docs/config.md"
    # Every field of every section has a row: a new field cannot be left out of the reference.
    for name, section in SECTIONS.items():
        for field in section.model_fields:
            assert f"| `{name}.{field}` |" in committed
