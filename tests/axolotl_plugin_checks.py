"""In-process checks of `STRPlugin` inside Axolotl, run by tests/test_axolotl.py with the Axolotl
environment's Python: `python axolotl_plugin_checks.py CONFIG.json`. Exits non-zero on the first failure.

CONFIG.json holds {"config": <an Axolotl config with the plugin and a `str:` block>, "examples": [paths]}.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from axolotl.integrations.base import PluginManager
from axolotl.utils.config import prepare_plugins, validate_config
from axolotl.utils.dict import DictDefault
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from str_hooks.errors import STRConfigError
from str_hooks.integrations.axolotl import PLUGIN_PATH, STRPlugin


def validated(raw: dict[str, Any]) -> DictDefault:
    """Axolotl's own config path: register the listed plugins, then validate with their schemas merged."""
    PluginManager.get_instance().plugins.clear()  # a process-wide singleton
    cfg = DictDefault(copy.deepcopy(raw))
    prepare_plugins(cfg)
    return validate_config(cfg)


def check_block_without_plugin_is_dropped(raw: dict[str, Any]) -> None:
    # Documents the limitation the command-line check exists for: Axolotl keeps quiet and drops it.
    bare = {k: v for k, v in raw.items() if k != "plugins"}
    assert "str" not in validated(bare), "Axolotl 0.19 was expected to drop an unknown `str:` block"


def check_block_is_a_validated_field(raw: dict[str, Any]) -> None:
    cfg = validated(raw)
    assert cfg["str"]["coef"] == raw["str"]["coef"] and cfg["str"]["penalty"]["form"] == "mse", cfg["str"]
    # Axolotl's own validation (the merged STRArgs schema) names a misspelt key too, even without the
    # plugin's register() check in front of it.
    PluginManager.get_instance().plugins.clear()
    bad = DictDefault(copy.deepcopy(raw))
    bad["str"]["penalty"] = {"from": "mse"}
    prepare_plugins(DictDefault({"plugins": [PLUGIN_PATH]}))
    try:
        validate_config(bad)
    except Exception as exc:
        assert "unknown key `from`" in str(exc) and "Did you mean `form`" in str(exc), exc
    else:
        raise AssertionError("a misspelt key under `str.penalty` passed Axolotl's validation")


def check_register_fails_fast(raw: dict[str, Any]) -> None:
    full_ft = {k: v for k, v in raw.items() if k != "adapter" and not k.startswith("lora_")}
    try:
        validated(full_ft)
    except STRConfigError as exc:
        assert "`str.reference.source` is 'adapter'" in str(exc) and "adapter: lora" in str(exc), exc
    else:
        raise AssertionError("register() accepted reference.source adapter without an adapter")


def check_examples_validate(paths: list[str]) -> None:
    for path in paths:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        cfg = validated(raw)
        assert "str" in cfg, path


def check_hooks_on_a_plain_trainer(raw: dict[str, Any], workdir: Path) -> None:
    """post_trainer_create on a plain HF Trainer (any trainer class works), PEFT 0.20's tuner forward
    routed through the module call during training and restored after post_train, which is idempotent;
    no `str:` block: nothing happens."""
    from peft import LoraConfig, get_peft_model

    plugin = STRPlugin()
    sentinel = object()
    plugin.register(DictDefault({"plugins": [PLUGIN_PATH]}))
    plugin.post_trainer_create(DictDefault({"plugins": [PLUGIN_PATH]}), sentinel)  # no str: untouched
    assert plugin.callback is None

    tokenizer = AutoTokenizer.from_pretrained(raw["base_model"])
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(raw["base_model"]),
        # task_type CAUSAL_LM (as Axolotl sets it): PEFT 0.20's PeftModelForCausalLM reaches the causal LM
        # through `tuner.model.forward(...)`, the path where the penalty would silently be zero.
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM"
        ),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    ids = tokenizer("Sorry, I cannot help with that request.", add_special_tokens=False)["input_ids"]
    rows = [{"input_ids": ids, "labels": ids}] * 4
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(workdir / "plain-trainer"),
            per_device_train_batch_size=4,
            max_steps=2,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        ),
        train_dataset=rows,
        processing_class=tokenizer,
    )
    # The package's defaults (kl at anchors, 4-token openings, benign anchors) with a coef.
    cfg = DictDefault({"plugins": [PLUGIN_PATH], "adapter": "lora", "str": {"coef": 2.0, "tokens": {"k": 8}}})
    plugin.register(cfg)
    plugin.post_trainer_create(cfg, trainer)
    assert plugin.callback is not None
    tuner = model.base_model
    assert "forward" in vars(tuner), "PEFT < 0.21's tuner forward was not routed through the module call"
    trainer.train()
    logged = [e for e in trainer.state.log_history if "str/penalty" in e]
    assert len(logged) == 2 and logged[1]["str/penalty"] > 0, trainer.state.log_history
    plugin.post_train(cfg, model)
    plugin.post_train(cfg, model)  # Axolotl calls it twice
    assert "forward" not in vars(tuner) and plugin.callback is None
    assert not hasattr(model.get_base_model(), "_str_hooks_handle")


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    raw, workdir = spec["config"], Path(spec["workdir"])
    check_block_without_plugin_is_dropped(raw)
    check_block_is_a_validated_field(raw)
    check_register_fails_fast(raw)
    check_examples_validate(spec["examples"])
    check_hooks_on_a_plain_trainer(raw, workdir)
    print("all plugin checks passed")


if __name__ == "__main__":
    main()
