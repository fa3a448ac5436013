"""Axolotl plugin: the config checks (this environment, no Axolotl needed) and `axolotl train` end to end.

Axolotl 0.19 pins transformers, peft, trl and pydantic versions that differ from this environment's, so it
lives in its own `.venv-axolotl` (`make axolotl-venv`, a prerequisite of `make test`); every test that
needs it runs that environment's executables in a subprocess, on a tiny model and a dataset built here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers.factory import make_model, make_tokenizer
from helpers.launch import free_port

from str_hooks import STRConfig, STRConfigError
from str_hooks.integrations.axolotl import PLUGIN_PATH, STRArgs, check_config
from str_hooks.integrations.axolotl.check import main as check_main
from str_hooks.prompts import default_texts

ROOT = Path(__file__).resolve().parent.parent
AXOLOTL_BIN = ROOT / ".venv-axolotl" / "bin"
EXAMPLES = sorted((ROOT / "examples" / "axolotl").glob("*.yml"))
# The training runs below are long enough for the adapter to move the safety logits visibly.
STEPS = 20
LIGER_STEPS = 6


# -- the checks, in this environment ---------------------------------------------------------------------
ADAPTER: dict[str, Any] = {"reference": {"source": "adapter"}}


def lora_config(**extra: Any) -> dict[str, Any]:
    return {"plugins": [PLUGIN_PATH], "adapter": "lora", "str": {"coef": 0.1}, **extra}


def test_args_schema_is_the_str_config() -> None:
    assert set(STRArgs.model_fields) == {"str"}
    args = STRArgs.model_validate({"str": {"coef": 0.1, "penalty": {"form": "hinge"}}})
    assert isinstance(args.str, STRConfig) and args.str.penalty.form == "hinge"
    assert STRArgs().str is None
    with pytest.raises(ValueError, match=r"unknown key `coeff`.*Did you mean `coef`"):
        STRArgs.model_validate({"str": {"coeff": 0.1}})


def test_valid_config_and_no_block() -> None:
    config = check_config(lora_config())
    # The defaults (kl at anchors) with a coef.
    assert config is not None and config.coef == 0.1 and config.reference.source == "anchors"
    assert config.penalty.form == "kl"
    assert check_config({"plugins": [PLUGIN_PATH], "adapter": "lora"}) is None


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        ({"coeff": 0.1}, r"`str`: unknown key `coeff` \(value 0.1\).*Did you mean `coef`"),
        ({"penalty": {"from": "mse"}}, r"`str.penalty`: unknown key `from`.*Did you mean `form`"),
        ({"coef": -1}, r"`coef` must be a finite number >= 0, got -1"),
        ({"reference": {"source": "cache"}}, r"`reference.cache_path` is not set"),
    ],
)
def test_invalid_block_names_the_key(block: dict[str, Any], expected: str) -> None:
    with pytest.raises(STRConfigError, match=expected):
        check_config(lora_config(str=block))


def test_block_without_the_plugin() -> None:
    with pytest.raises(STRConfigError, match=r"does not list `str_hooks.integrations.axolotl.STRPlugin`"):
        check_config({"adapter": "lora", "str": {"coef": 0.1}})
    with pytest.raises(STRConfigError, match=r"`str_hooks.integration.axolotl.STRPlugin` is not it"):
        check_config({"plugins": ["str_hooks.integration.axolotl.STRPlugin"], "str": {"coef": 0.1}})
    # The plugin checking its own config knows it is listed.
    assert check_config({"adapter": "lora", "str": {}}, plugin_required=False) is not None


@pytest.mark.parametrize("key", ["STR", "str_hooks", "Str"])
def test_misspelt_block_key(key: str) -> None:
    with pytest.raises(STRConfigError, match=rf"top-level key `{key}` looks like the STR block"):
        check_config({"plugins": [PLUGIN_PATH], key: {"coef": 0.1}})


def test_block_must_be_a_mapping() -> None:
    with pytest.raises(STRConfigError, match=r"`str:` must be a mapping.*got float 0.1"):
        check_config({"plugins": [PLUGIN_PATH], "str": 0.1})


def test_combinations_that_cannot_work(tmp_path: Path) -> None:
    zero3 = tmp_path / "ds.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    cache = tmp_path / "ref.safetensors"
    cache.write_bytes(b"")
    cases: list[tuple[dict[str, Any], str]] = [
        (
            {"adapter": None, "str": ADAPTER},
            r"`str.reference.source` is 'adapter' but the config sets no `adapter:`",
        ),
        (
            {"adapter": None, "str": {"reference": {"rows": "adapter"}}},
            r"`str.reference.rows` is 'adapter' but the config sets no `adapter:`",
        ),
        (
            {"cut_cross_entropy": True, "str": {"reference": {"rows": "adapter"}}},
            r"'kl' but `cut_cross_entropy: true` never builds the full logits",
        ),
        (
            {"cut_cross_entropy": True, "str": {"penalty": {"form": "logprob"}, **ADAPTER}},
            r"'logprob' but `cut_cross_entropy: true` never builds the full logits",
        ),
        (
            {"liger_fused_linear_cross_entropy": True, "str": {"penalty": {"form": "logprob"}, **ADAPTER}},
            r"'logprob' but `liger_fused_linear_cross_entropy: true`",
        ),
        (
            {"liger_fused_linear_cross_entropy": True, "str": {"penalty": {"form": "kl"}, **ADAPTER}},
            r"'kl' but `liger_fused_linear_cross_entropy: true`",
        ),
        (
            {"sample_packing": True, "str": {"reference": {"source": "cache", "cache_path": str(cache)}}},
            r"'cache' but `sample_packing: true`",
        ),
        (
            {
                "sample_packing": True,
                "str": {"reference": {"source": "anchors", "anchor_placement": "folded"}},
            },
            r"'folded' but `sample_packing: true` numbers the packed samples",
        ),
        ({"fsdp_config": {"fsdp_version": 2}, "str": ADAPTER}, r"'adapter' under FSDP"),
        # ZeRO-3 only with a frozen head: not with full fine-tuning, LoRA or modules_to_save on the head.
        ({"deepspeed": str(zero3), "adapter": None}, r"ZeRO stage 3 and full fine-tuning"),
        ({"deepspeed": "deepspeed_configs/zero3.json", "adapter": None}, r"ZeRO stage 3 and full"),
        (
            {"deepspeed": str(zero3), "lora_modules_to_save": ["lm_head"]},
            r"`lora_modules_to_save: \['lm_head'\]`",
        ),
        (
            {"deepspeed": str(zero3), "lora_target_modules": ["q_proj", "lm_head"]},
            r"ZeRO stage 3 and `lora_target",
        ),
        ({"rl": "dpo"}, r"`rl: dpo`"),
        (
            {"str": {"tokens": {"path": str(tmp_path / "missing.json")}}},
            r"`str.tokens.path` is .*does not exist",
        ),
    ]
    for extra, expected in cases:
        with pytest.raises(STRConfigError, match=expected):
            check_config(lora_config(**extra))
    # Fine: fused kernels with the hidden-state forms (and the defaults: kl at anchors), cache without
    # packing, ZeRO-2, FSDP and full fine-tuning with anchors (the default source).
    zero2 = tmp_path / "ds2.json"
    zero2.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    for extra in (
        {"cut_cross_entropy": True},
        {"cut_cross_entropy": True, "str": {"penalty": {"form": "mse"}, **ADAPTER}},
        {"adapter": None},
        {"fsdp_config": {"fsdp_version": 2}},
        {"liger_fused_linear_cross_entropy": True, "str": {"penalty": {"form": "hinge"}}},
        {"str": {"reference": {"source": "cache", "cache_path": str(cache)}}},
        {"str": {"reference": {"source": "anchors", "anchor_placement": "folded"}}},
        {
            "liger_fused_linear_cross_entropy": True,
            "str": {
                "penalty": {"form": "kl"},
                "reference": {
                    "source": "anchors",
                    "anchor_placement": "folded",
                    "anchor_tokens": 4,
                    "benign_weight": 1.0,
                },
            },
        },
        {"deepspeed": str(zero2)},
        {"deepspeed": str(zero2), "adapter": None},
        {"deepspeed": str(zero3)},  # LoRA on the decoder: the head stays frozen (tests/test_deepspeed.py)
        {"deepspeed": "deepspeed_configs/zero3_bf16.json", "lora_target_linear": True},
        {"fsdp_config": {"fsdp_version": 2}, "adapter": None, "str": {"reference": {"source": "anchors"}}},
    ):
        assert check_config(lora_config(**extra)) is not None, extra


def test_every_problem_is_reported_at_once() -> None:
    cfg = {
        "rl": "dpo",
        "sample_packing": True,
        "str": {"penalty": {"form": "logprob"}, **ADAPTER},
        "cut_cross_entropy": True,
    }
    with pytest.raises(STRConfigError, match=r"\(4 problems\)") as info:
        check_config(cfg)
    for part in ("does not list", "no `adapter:`", "`cut_cross_entropy: true`", "`rl: dpo`"):
        assert part in str(info.value)


def test_command_line_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = tmp_path / "good.yml", tmp_path / "bad.yml"
    good.write_text(yaml.safe_dump(lora_config()))
    bad.write_text(yaml.safe_dump({"adapter": "lora", "str": {"coef": 0.1}}))
    assert check_main([str(good)]) == 0
    assert "OK (coef 0.1, reference anchors, penalty kl" in capsys.readouterr().out
    assert check_main([str(good), str(bad)]) == 1
    assert "does not list `str_hooks.integrations.axolotl.STRPlugin`" in capsys.readouterr().err
    run = subprocess.run(
        [sys.executable, "-m", "str_hooks.integrations.axolotl.check", str(bad)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1 and "plugins:" in run.stderr


def test_examples_pass_the_check() -> None:
    assert {p.name for p in EXAMPLES} == {"lora.yml", "full.yml"}
    for path in EXAMPLES:
        raw = yaml.safe_load(path.read_text())
        config = check_config(raw)
        assert config is not None and raw["bf16"] is False and raw["sample_packing"] is False, path
    full = yaml.safe_load((ROOT / "examples" / "axolotl" / "full.yml").read_text())
    assert "adapter" not in full and full["str"]["reference"]["source"] != "adapter"


def test_readme_yaml_block_equals_the_defaults() -> None:
    text = (ROOT / "integrations" / "axolotl" / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```yaml\n")[1:]]
    defaults = next(yaml.safe_load(b) for b in blocks if "# defaults" in b)
    assert defaults["str"] == STRConfig().model_dump(mode="json")


def test_plugin_needs_axolotl_with_an_install_hint() -> None:
    code = (
        "import sys, str_hooks.integrations.axolotl as a\n"
        "assert 'axolotl' not in sys.modules\n"
        "try:\n    a.STRPlugin\nexcept ImportError as e:\n    print('ImportError:', e)\nelse:\n    print('imported')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    try:
        import axolotl  # noqa: F401
    except ImportError:
        assert 'pip install -e ".[axolotl]"' in out.stdout, out
    else:  # pragma: no cover - only where Axolotl is installed beside the tests
        assert out.stdout.strip() == "imported"


# -- Axolotl itself, in its own environment ------------------------------------------------------------
def axolotl_env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(
        CUDA_VISIBLE_DEVICES="",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(work / "hf-home"),
        AXOLOTL_DO_NOT_TRACK="1",
        OMP_NUM_THREADS="1",  # runs go side by side on few cores
        WANDB_MODE="disabled",
        PATH=f"{AXOLOTL_BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


def train_config(work: Path, name: str, block: dict[str, Any] | None, lora: bool = True) -> Path:
    """An Axolotl YAML for a CPU run on the tiny model; returns its path. The settings a CPU run needs are
    documented in examples/axolotl/*.yml."""
    cfg: dict[str, Any] = {
        "base_model": str(work / "model"),
        "datasets": [
            {
                "path": str(work / "train.jsonl"),
                "ds_type": "json",
                "type": "chat_template",
                "field_messages": "messages",
                "roles_to_train": ["assistant"],
            }
        ],
        "chat_template": "tokenizer_default",
        "eot_tokens": ["<|end|>"],
        # Shared: prepared once by `axolotl preprocess` before the training runs start.
        "dataset_prepared_path": str(work / "prepared"),
        "output_dir": str(work / name),
        "sequence_len": 128,
        "sample_packing": False,
        "micro_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "max_steps": STEPS,
        "num_epochs": 1,
        "learning_rate": 0.005,
        "lr_scheduler": "constant",
        "warmup_steps": 0,
        "optimizer": "adamw_torch",
        "weight_decay": 0.0,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "flash_attention": False,
        "logging_steps": 1,
        # One checkpoint at the end: its trainer_state.json holds the log history and the STR state.
        "save_strategy": "steps",
        "save_steps": STEPS,
        "val_set_size": 0,
        "seed": 0,
        "plugins": [PLUGIN_PATH],
    }
    if lora:
        cfg.update(
            adapter="lora",
            # Axolotl seeds nothing before it creates the adapter (the Trainer's `seed` comes later): start
            # every run from the same saved adapter (B = 0) so runs differ only by their STR settings.
            lora_model_dir=str(work / "lora-init"),
            lora_r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            lora_target_linear=True,
            # Axolotl turns its fused LoRA kernels on by default; they need CUDA.
            lora_mlp_kernel=False,
            lora_qkv_kernel=False,
            lora_o_kernel=False,
        )
    if block is not None:
        cfg["str"] = block
    path = work / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def liger_config(work: Path, name: str, block: dict[str, Any], lora: bool) -> Path:
    """`train_config` with Liger's plugin and fused linear cross-entropy, LIGER_STEPS steps, no checkpoint."""
    path = train_config(work, name, block, lora=lora)
    raw = yaml.safe_load(path.read_text())
    raw.update(
        plugins=["axolotl.integrations.liger.LigerPlugin", PLUGIN_PATH],
        liger_fused_linear_cross_entropy=True,
        max_steps=LIGER_STEPS,
        save_strategy="no",
    )
    raw.pop("save_steps")
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def zero3_config(work: Path, name: str, block: dict[str, Any]) -> Path:
    """`train_config` (LoRA: the head stays frozen) with `deepspeed:` a ZeRO-3 JSON that partitions every
    parameter (by default ZeRO-3 keeps small ones, all of a tiny model, whole), no checkpoint."""
    ds = work / f"{name}-ds.json"
    ds.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "gradient_clipping": "auto",
                "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                "zero_allow_untested_optimizer": True,
                "fp16": {"enabled": False},
                "bf16": {"enabled": False},
            }
        )
    )
    path = train_config(work, name, block)
    raw = yaml.safe_load(path.read_text())
    raw.update(deepspeed=str(ds), save_strategy="no")
    raw.pop("save_steps")
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny aligned-model stand-in, its tokenizer and a chat dataset, on disk."""
    root = tmp_path_factory.mktemp("axolotl")
    from peft import LoraConfig, get_peft_model

    tokenizer = make_tokenizer()
    model = make_model("llama")
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    get_peft_model(model, lora).save_pretrained(str(root / "lora-init"))
    prompts, answers = default_texts("benign_prompts"), default_texts("benign_contrast")
    with (root / "train.jsonl").open("w") as out:
        for i in range(64):
            turns = [
                {"role": "user", "content": prompts[i % len(prompts)]},
                {"role": "assistant", "content": answers[i % len(answers)]},
            ]
            out.write(json.dumps({"messages": turns}) + "\n")
    return root


class Runs:
    """Subprocesses in Axolotl's environment, all started at once (most of each is Python start-up, and
    they overlap well); `result(name)` waits for one."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.results: dict[str, subprocess.CompletedProcess[str]] = {}

    def start(self, name: str, command: list[str], **env: str) -> None:
        # Output to a file, not a pipe: a full pipe nobody reads yet would stall the run.
        with (self.work / f"{name}.log").open("w") as log:
            self.procs[name] = subprocess.Popen(
                command, cwd=self.work, env={**axolotl_env(self.work), **env}, stdout=log, stderr=log
            )

    def result(self, name: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        if name not in self.results:
            proc = self.procs[name]
            proc.wait(timeout=timeout)
            out = (self.work / f"{name}.log").read_text(errors="replace")
            self.results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, "")
        return self.results[name]

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def axolotl_train(config: Path) -> list[str]:
    return [str(AXOLOTL_BIN / "axolotl"), "train", str(config), "--launcher", "python"]


@pytest.fixture(scope="module")
def runs(work: Path) -> Iterator[Runs]:
    """Every Axolotl run of this module, started together."""
    if not (AXOLOTL_BIN / "axolotl").exists():
        pytest.skip(f"no Axolotl environment at {AXOLOTL_BIN.parent}: build it with `make axolotl-venv`")
    started = Runs(work)
    # Training positions against the adapter-disabled model: what `safety_drift` measures. The defaults (kl at
    # anchors) run through the plugin in axolotl_plugin_checks.py, and folded kl anchors under Liger below.
    block = {"tokens": {"k": 16}, "penalty": {"form": "mse"}, **ADAPTER}
    configs = {
        name: train_config(work, name, {**block, "coef": coef})
        for name, coef in (("coef0", 0.0), ("coef20", 20.0))
    }
    started.start("preprocess", [str(AXOLOTL_BIN / "axolotl"), "preprocess", str(configs["coef0"])])
    started.start("misspelt", axolotl_train(train_config(work, "misspelt", {**block, "coeff": 0.1})))
    spec = {
        "config": yaml.safe_load(
            train_config(work, "checks", {"coef": 0.1, "penalty": {"form": "mse"}, **ADAPTER}).read_text()
        ),
        "workdir": str(work),
        "examples": [str(p) for p in EXAMPLES],
    }
    (work / "checks.json").write_text(json.dumps(spec))
    script = Path(__file__).parent / "axolotl_plugin_checks.py"
    started.start("checks", [str(AXOLOTL_BIN / "python"), str(script), str(work / "checks.json")])
    # Full fine-tuning, Liger's fused linear cross-entropy, a reference model loaded from base_model.
    liger = liger_config(work, "liger", {**block, "coef": 5.0, "reference": {"source": "model"}}, lora=False)
    # LoRA with the anchors folded into Liger's fused forward (`logits_to_keep` keeps the CE on the rows).
    folded_block = {
        **block,
        "coef": 5.0,
        # The decision-point methods: the coarse KL needs the full softmax at the anchors, which the fused
        # forward never builds; the tap takes it from the hidden states at the anchor positions.
        "penalty": {"form": "kl"},
        "reference": {
            "source": "anchors",
            "anchor_placement": "folded",
            "anchor_batch_size": 2,
            "anchor_tokens": 3,
            "benign_weight": 0.5,
        },
    }
    liger_folded = liger_config(work, "liger-folded", folded_block, lora=True)
    zero3 = zero3_config(work, "zero3", {"coef": 5.0})
    prepared = started.result("preprocess")
    assert prepared.returncode == 0, prepared.stdout[-5000:]
    for name, config in configs.items():
        started.start(name, axolotl_train(config))
    script = Path(__file__).parent / "axolotl_cpu_liger.py"
    calls = work / "liger-calls.txt"
    started.start("liger", [str(AXOLOTL_BIN / "python"), str(script), str(liger)], STR_LIGER_CALLS=str(calls))
    # Two ranks under DeepSpeed ZeRO-3 on DeepSpeed's CPU accelerator (the package defaults but the coef).
    started.start(
        "zero3",
        [
            str(AXOLOTL_BIN / "python"),
            *("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"),
            *("--master_port", str(free_port()), "-m", "axolotl.cli.train", str(zero3)),
        ],
        DS_ACCELERATOR="cpu",
    )
    started.start(
        "liger-folded",
        [str(AXOLOTL_BIN / "python"), str(script), str(liger_folded)],
        STR_LIGER_CALLS=str(work / "liger-folded-calls.txt"),
    )
    try:
        yield started
    finally:
        started.stop()


def state_of(run_dir: Path) -> dict[str, Any]:
    state: dict[str, Any] = json.loads((run_dir / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return state


def safety_drift(work: Path, run_dir: Path) -> float:
    """Mean |z - r| of the safety logits of the trained adapter (z) and the base model (r, adapters
    disabled), at every position of 16 training conversations, for the tokens the run regularized."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from str_hooks import SafetyTokens

    tokens = SafetyTokens.from_dict(state_of(run_dir)["stateful_callbacks"]["str_hooks"]["tokens"])
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "model"), run_dir).eval()
    ids = torch.tensor(tokens.ids)
    drifts = []
    for line in (work / "train.jsonl").read_text().splitlines()[:16]:
        seq = tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=True, return_dict=False)
        inputs = torch.tensor([list(seq)])
        with torch.no_grad():
            z = model(input_ids=inputs).logits[0][:, ids]
            with model.disable_adapter():
                r = model(input_ids=inputs).logits[0][:, ids]
        drifts.append((z - r).abs().flatten())
    return float(torch.cat(drifts).mean())


@pytest.mark.slow
@pytest.mark.axolotl_env
def test_axolotl_train_logs_the_penalty_and_keeps_the_safety_logits(work: Path, runs: Runs) -> None:
    """`axolotl train` of a LoRA adapter, coef 0 and 20 from the same initial adapter: str/* in Axolotl's
    logs (once per step), and the adapter trained with the penalty moves the safety logits far less."""
    for name in ("coef0", "coef20"):
        result = runs.result(name)
        assert result.returncode == 0, f"{name}:\n{result.stdout[-5000:]}"
        assert "STR attached: coef" in result.stdout
        assert len(_printed(result.stdout, "str/penalty")) == STEPS, result.stdout[-3000:]
        history = [e for e in state_of(work / name)["log_history"] if "loss" in e]
        assert len(history) == STEPS and all("str/penalty" in e and "str/abs_drift" in e for e in history)
    pen0 = [e["str/penalty"] for e in state_of(work / "coef0")["log_history"] if "str/penalty" in e]
    pen20 = [e["str/penalty"] for e in state_of(work / "coef20")["log_history"] if "str/penalty" in e]
    assert all(p == 0 for p in pen0) and min(pen20[1:]) > 0  # coef 0 measures but adds nothing
    drift0, drift20 = safety_drift(work, work / "coef0"), safety_drift(work, work / "coef20")
    assert drift0 > 0.5, (drift0, drift20)
    assert drift20 < 0.25 * drift0, (drift0, drift20)  # measured: 1.08 and 0.07


@pytest.mark.slow
@pytest.mark.axolotl_env
def test_misspelt_key_fails_axolotl_train(work: Path, runs: Runs) -> None:
    result = runs.result("misspelt")
    assert result.returncode != 0
    assert "unknown key `coeff` (value 0.1)" in result.stdout and "Did you mean `coef`?" in result.stdout
    assert not (work / "misspelt").exists()  # stopped before anything was loaded or written


@pytest.mark.slow
@pytest.mark.axolotl_env
def test_liger_fused_cross_entropy_full_finetune_with_model_reference(work: Path, runs: Runs) -> None:
    """Liger's fused linear cross-entropy (its kernel swapped for plain torch: Triton needs a GPU) never
    builds logits in training; STR projects the safety logits from hidden states. Full fine-tuning with a
    frozen reference model loaded from `base_model`."""
    result = runs.result("liger")
    assert result.returncode == 0, result.stdout[-5000:]
    # Every training micro-batch went through the fused loss, which returns no logits.
    assert int((work / "liger-calls.txt").read_text()) == LIGER_STEPS
    assert "STR: loading the reference model" in result.stdout
    penalties = [float(v) for v in _printed(result.stdout, "str/penalty")]
    assert len(penalties) == LIGER_STEPS and penalties[0] == 0, penalties  # step 1: policy == reference
    assert all(p > 0 for p in penalties[1:]), penalties


@pytest.mark.slow
@pytest.mark.axolotl_env
def test_folded_anchors_ride_in_ligers_fused_forward(work: Path, runs: Runs) -> None:
    """`reference.anchor_placement: folded` under Axolotl with Liger's fused cross-entropy: the anchors
    are packed into every training forward (the fused loss runs once per step, on the rows only), and the
    anchor penalty is logged each step, positive once the adapter has moved (its B starts at 0). The block
    uses the decision-point methods (coarse KL over 3-token openings, benign anchors), which need the full
    softmax at the anchor positions of a forward that builds no logits."""
    result = runs.result("liger-folded")
    assert result.returncode == 0, result.stdout[-5000:]
    assert "the decision point of anchor prompts and up to 2 more tokens" in result.stdout
    assert int((work / "liger-folded-calls.txt").read_text()) == LIGER_STEPS
    penalties = [float(v) for v in _printed(result.stdout, "str/penalty")]
    assert len(penalties) == LIGER_STEPS and all(p > 0 for p in penalties[1:]), penalties


@pytest.mark.slow
@pytest.mark.axolotl_env
def test_zero3_two_ranks_through_axolotl(runs: Runs) -> None:
    """`deepspeed:` a ZeRO-3 JSON, two ranks on DeepSpeed's CPU accelerator, LoRA (the head frozen, its
    safety rows gathered once): both ranks attach STR and train; the anchor term is logged every step, ~0 at
    the first (the adapter's B starts at 0; the anchors' reference is read along their decoding, the full rows'
    values within float precision) and well above it once the adapter moves. The update's equality with one
    process is tests/test_deepspeed.py's."""
    result = runs.result("zero3")
    assert result.returncode == 0, result.stdout[-5000:]
    assert '"stage": 3' in result.stdout  # Axolotl passed the ZeRO-3 JSON on
    assert "[RANK:1] STR attached" in result.stdout
    penalties = [float(v) for v in _printed(result.stdout, "str/penalty")]
    assert len(penalties) >= STEPS and penalties[0] < 1e-6 < max(penalties), penalties


@pytest.mark.slow
@pytest.mark.axolotl_env
def test_plugin_inside_axolotl(runs: Runs) -> None:
    """Axolotl's own config validation with the plugin (and without it), register() failing fast, the
    examples, and the hooks on a plain Trainer: tests/axolotl_plugin_checks.py in Axolotl's environment."""
    result = runs.result("checks")
    assert result.returncode == 0 and "all plugin checks passed" in result.stdout, result.stdout[-5000:]


def _printed(stdout: str, key: str) -> list[str]:
    """Values of `key` in the log dicts the trainer prints (`{'loss': '6.7', 'str/penalty': '0.1', ...}`)."""
    values = []
    for line in stdout.splitlines():
        marker = f"'{key}': '"
        while marker in line:
            line = line.split(marker, 1)[1]
            values.append(line.split("'", 1)[0])
    return values
