"""Checks of the STR part of an Axolotl config (also run by `python -m str_hooks.integrations.axolotl.check`).

`check_config` runs where the plugin registers (on the raw YAML mapping, before Axolotl loads anything)
and in the command-line check. It needs neither Axolotl nor a model: pydantic validation of the `str:`
block, then the combinations of STR and Axolotl options that cannot work, all reported at once.

Axolotl 0.19 drops unknown top-level keys silently, so a `str:` block without the plugin listed under
`plugins:` trains without STR and nothing of str-hooks runs to notice. Run the command-line check on a
config before training (CI, a launcher script) to catch that case.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from str_hooks.errors import STRConfigError
from str_hooks.schemas.config import STRConfig

PLUGIN_PATH = "str_hooks.integrations.axolotl.STRPlugin"
# Top-level keys a user may write instead of `str:`; Axolotl would drop them without a word.
_ALIASES = ("str_hooks", "str-hooks", "strhooks", "safety_token_regularization", "str_config")
_FUSED_CE_KEYS = ("cut_cross_entropy", "liger_fused_linear_cross_entropy")


def check_config(cfg: Mapping[str, Any], *, plugin_required: bool = True) -> STRConfig | None:
    """Validate the STR part of an Axolotl config.

    Args:
        cfg: the Axolotl config as a mapping (the raw YAML, or Axolotl's validated `DictDefault`).
        plugin_required: also require `str_hooks.integrations.axolotl.STRPlugin` under `plugins:` when
            a `str:` block is present (the plugin itself passes False: it is running, so it is listed).

    Returns:
        The validated `STRConfig`, or None when the config has no `str:` block (STR off).

    Raises:
        STRConfigError: every problem found, one per line, each naming the keys and the fix: an invalid
            `str:` block (unknown key, bad value), a `str:` block without the plugin, a misspelt `str:`
            key, or options that cannot work together (see the Axolotl section of the README).

    Example:
        >>> check_config({"adapter": "lora", "str": {"coef": 0.1}}, plugin_required=False).coef
        0.1
    """
    block = cfg.get("str")
    if block is None:
        _check_aliases(cfg)
        return None
    if not isinstance(block, Mapping):
        raise STRConfigError(
            f"`str:` must be a mapping of STR options, got {type(block).__name__} {block!r}: write e.g. "
            "`str: {coef: 0.1}`."
        )
    problems: list[str] = []
    if plugin_required:
        problem = _plugin_problem(cfg.get("plugins"))
        if problem:
            problems.append(problem)
    try:
        config = STRConfig.model_validate(_plain(block))
    except ValidationError as exc:
        problems.extend(_describe(exc))
        raise STRConfigError(_message(problems)) from None
    problems.extend(incompatibilities(cfg, config))
    if problems:
        raise STRConfigError(_message(problems))
    return config


def incompatibilities(cfg: Mapping[str, Any], config: STRConfig) -> list[str]:
    """The STR / Axolotl option combinations in `cfg` that cannot work, one message each (empty if none).

    Args:
        cfg: the Axolotl config mapping.
        config: its validated `str:` block.
    """
    out: list[str] = []
    source, form = config.reference.source, config.penalty.form
    # `reference.rows: adapter` needs what source `adapter` needs; its messages name the field that was set.
    adapter_field = (
        "source" if source == "adapter" else "rows" if config.reference.rows == "adapter" else None
    )
    training_softmax = form in ("logprob", "kl") and (
        source != "anchors" or config.reference.rows is not None
    )
    if adapter_field is not None and not cfg.get("adapter"):
        out.append(
            f"`str.reference.{adapter_field}` is 'adapter' but the config sets no `adapter:` (full "
            "fine-tuning): there are no adapters to disable for the reference. Set `adapter: lora` (or qlora), "
            + (
                "or `str.reference.source: anchors` (reference computed once at attach) or `model` (a frozen "
                "copy; `str.reference.model_path` defaults to `base_model`)."
                if adapter_field == "source"
                else "or remove `str.reference.rows` (anchors only)."
            )
        )
    fused = [key for key in _FUSED_CE_KEYS if cfg.get(key)]
    if training_softmax and fused:
        # At anchors the softmax is taken from hidden states at the anchor positions: fused kernels are fine.
        out.append(
            f"`str.penalty.form` is {form!r} but `{fused[0]}: true` never builds the full logits it needs at "
            "training positions: "
            + (
                "use `str.penalty.form: mse` or `hinge` (they project from hidden states), "
                "`str.reference.source: anchors` (the softmax at the anchor positions only), "
                if config.reference.rows is None
                else "remove `str.reference.rows` (the rows' gate needs them), "
            )
            + f"or turn `{fused[0]}` off."
        )
    if source == "cache" and cfg.get("sample_packing"):
        out.append(
            "`str.reference.source` is 'cache' but `sample_packing: true` packs several examples into one row, "
            "and the cache is keyed by the token ids of each unpacked example: set `sample_packing: false`, or "
            "use `str.reference.source: adapter` or `anchors`."
        )
    if config.reference.anchor_placement == "folded" and cfg.get("sample_packing"):
        out.append(
            "`str.reference.anchor_placement` is 'folded' but `sample_packing: true` numbers the packed samples "
            "in `attention_mask`, which the fold cannot keep exact: set `sample_packing: false`, or "
            "`str.reference.anchor_placement: separate`."
        )
    if adapter_field is not None and (cfg.get("fsdp_config") or cfg.get("fsdp")):
        out.append(
            f"`str.reference.{adapter_field}` is 'adapter' under FSDP (`fsdp_config`), where PEFT's "
            "disable_adapter() is known to break (PEFT #1442, #2977): "
            + (
                "use `str.reference.source: anchors`, `model` or `cache`."
                if adapter_field == "source"
                else "remove `str.reference.rows` (anchors only)."
            )
        )
    if _zero_stage(cfg.get("deepspeed")) == 3 and (trained := _trained_head(cfg)):
        out.append(
            f"`deepspeed: {cfg.get('deepspeed')}` is ZeRO stage 3 and {trained} trains the LM head: ZeRO-3 "
            "partitions it and str-hooks reads its safety rows outside its forward, so only a frozen head works "
            "there. Train LoRA on the decoder only (drop `lm_head` from the LoRA targets and modules to save), "
            "or use ZeRO-1/2 or FSDP (`fsdp_config`)."
        )
    if cfg.get("rl"):
        out.append(
            f"`rl: {cfg.get('rl')}`: STR regularizes the supervised fine-tuning loss of Axolotl's causal trainer; "
            "preference and RL trainers run other forwards and are not supported. Remove `rl` or the `str:` block."
        )
    for key, value in (
        ("str.tokens.path", config.tokens.path),
        ("str.tokens.templates", config.tokens.templates),
        ("str.reference.cache_path", config.reference.cache_path),
        ("str.reference.anchors_path", config.reference.anchors_path),
        ("str.probe.prompts_path", config.probe.prompts_path),
    ):
        if value is not None and not Path(value).exists():
            out.append(
                f"`{key}` is {value!r}, which does not exist (relative paths start where axolotl runs)."
            )
    return out


def _plugin_problem(plugins: Any) -> str | None:
    listed = [str(p) for p in plugins or []]
    if any(_is_str_plugin(p) for p in listed):
        return None
    close = [
        p for p in listed if p.endswith(".STRPlugin") or difflib.get_close_matches(p, [PLUGIN_PATH], 1, 0.8)
    ]
    hint = f" (`{close[0]}` is not it)" if close else ""
    return (
        f"the config has a `str:` block but `plugins:` does not list `{PLUGIN_PATH}`{hint}: Axolotl 0.19 "
        f"drops the block silently and trains without STR. Add\n  plugins:\n    - {PLUGIN_PATH}"
    )


def _is_str_plugin(entry: str) -> bool:
    module, _, name = entry.rpartition(".")
    return name == "STRPlugin" and module in (
        "str_hooks.integrations.axolotl",
        "str_hooks.integrations.axolotl.plugin",
    )


def _check_aliases(cfg: Mapping[str, Any]) -> None:
    for key in cfg:
        if str(key).lower() in ("str", *_ALIASES) and key != "str":
            raise STRConfigError(
                f"top-level key `{key}` looks like the STR block, which must be spelt `str:` (lower case); "
                "Axolotl would drop it silently and train without STR. Rename it to `str:`."
            )


def _trained_head(cfg: Mapping[str, Any]) -> str | None:
    """What makes the LM head trainable in an Axolotl config (full fine-tuning, LoRA or modules to save on
    it), or None when the head stays frozen."""
    if not cfg.get("adapter"):
        return "full fine-tuning (no `adapter:`)"
    for key in ("lora_target_modules", "lora_modules_to_save"):
        value = cfg.get(key) or []
        names = [value] if isinstance(value, str) else list(value)
        if any(str(name).split(".")[-1] in ("lm_head", "embed_out", "output") for name in names):
            return f"`{key}: {value}`"
    return None


def _zero_stage(deepspeed: Any) -> int | None:
    """ZeRO stage of Axolotl's `deepspeed:` value (a JSON path or a mapping), None when unknown."""
    if not deepspeed:
        return None
    data: Any = deepspeed
    if not isinstance(deepspeed, Mapping):
        path = Path(str(deepspeed))
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            # Unreadable here (another machine?): go by Axolotl's own file names.
            return 3 if "zero3" in path.name else None
    stage = (data.get("zero_optimization") or {}).get("stage") if isinstance(data, Mapping) else None
    return int(stage) if isinstance(stage, int) else None


def _plain(value: Any) -> Any:
    """Plain dicts and lists (Axolotl's DictDefault answers None for missing keys)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _describe(exc: ValidationError) -> list[str]:
    out = []
    for error in exc.errors():
        loc = ".".join(str(part) for part in ("str", *error["loc"]))
        message = str(error["msg"]).removeprefix("Value error, ")
        out.append(f"`{loc}`: {message}")
    return out


def _message(problems: Sequence[str]) -> str:
    if len(problems) == 1:
        return f"invalid STR settings in the Axolotl config: {problems[0]}"
    listed = "\n".join(f"  - {p}" for p in problems)
    return f"invalid STR settings in the Axolotl config ({len(problems)} problems):\n{listed}"


__all__ = ["PLUGIN_PATH", "check_config", "incompatibilities"]
