"""adapter_config.json is user input: wrong-typed fields are refused (never coerced into another adapter)."""
from __future__ import annotations

import pytest

from leantrain.adapters import LoraConfig, MissConfig, ShiraConfig
from leantrain.adapters.vera import VeraConfig

CASES = [
    (LoraConfig, {"r": 8, "lora_alpha": 16}, "r", 8.0),
    (LoraConfig, {"r": 8, "lora_alpha": 16}, "use_rslora", "false"),
    (VeraConfig, {"r": 16}, "r", "16"),
    (VeraConfig, {"r": 16}, "save_projection", 0),
    (VeraConfig, {"r": 16}, "d_initial", "0.1"),
    (MissConfig, {"r": 4}, "r", 4.5),
    (MissConfig, {"r": 4}, "init_weights", "gaussian"),
    (MissConfig, {"r": 4}, "mini_r", True),
    (ShiraConfig, {"r": 4}, "r", -1),
    (ShiraConfig, {"r": 4}, "random_seed", 1.5),
    (ShiraConfig, {"r": 4}, "fraction", "0.01"),
    (ShiraConfig, {"r": 4}, "init_weights", "yes"),
]


@pytest.mark.parametrize("cls, base, key, value", CASES, ids=[f"{c.__name__}-{k}={v!r}" for c, _, k, v in CASES])
def test_wrong_typed_field_is_refused(cls, base, key, value):
    with pytest.raises(ValueError, match=key) as info:
        cls.from_peft_dict({**base, key: value})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("cls, base", [(LoraConfig, {"r": 8, "lora_alpha": 16, "use_rslora": True}),
                                       (VeraConfig, {"r": 16, "d_initial": 0.2}), (MissConfig, {"r": 4}),
                                       (ShiraConfig, {"r": 4, "random_seed": 3})])
def test_well_typed_fields_still_load(cls, base):
    config = cls.from_peft_dict(base)
    assert config.r == base["r"]
