"""`STRCallback` on a real Lightning `Trainer` with a tiny LoRA Llama: gradients against a hand-written
loss (accumulation 1/2/4, anchors, DDP on 2 CPU processes), bf16-mixed, resume, drift reduction, metrics,
the refusal probe, errors and teardown."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from helpers.configs import training_positions
from helpers.hf import anchor_config
from helpers.launch import run_two_processes
from helpers.losses import assert_grads_close, ce_by_hand, penalty_by_hand, positions_by_hand
from lightning.pytorch.loggers import CSVLogger
from lightning_ddp_worker import (
    COEF,
    GradCapture,
    LitLM,
    collate,
    examples,
    ordered,
    supervised_count,
    trainer_kwargs,
)
from torch.utils.data import DataLoader

from str_hooks import STRError, register_str_hook
from str_hooks.errors import STRAttachError, STRConfigError
from str_hooks.integrations.lightning import STRCallback
from str_hooks.testing import make_lora, make_model

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*"),
]
WORKER = Path(__file__).parent / "lightning_ddp_worker.py"


def hand_written_grads(
    micro_batches: list[dict[str, torch.Tensor]], tokens: Any, coef: float
) -> dict[str, Any]:
    """Gradient of mean over micro-batches of (CE mean + coef * penalty mean), on a fresh copy of the model:
    full logits gathered at the safety ids, the reference from `disable_adapter()`."""
    model = make_lora(make_model("llama"))
    model.train()
    total = torch.zeros(())
    for batch in micro_batches:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        logits = model(**inputs).logits
        with torch.no_grad(), model.disable_adapter():
            reference = model(**inputs).logits
        where = positions_by_hand(batch, "supervised", 1)
        pen = penalty_by_hand(logits, reference, tokens.ids, tokens.weights, where, "mse", 0.0)
        assert pen > 0
        total = total + ce_by_hand(logits, batch["labels"]) + coef * pen
    (total / len(micro_batches)).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def hook_counts(module: torch.nn.Module) -> tuple[int, int]:
    return (
        sum(len(m._forward_hooks) for m in module.modules()),
        sum(len(m._forward_pre_hooks) for m in module.modules()),
    )


def read_csv(logger: CSVLogger) -> list[dict[str, str]]:
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


# -- gradients -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("accumulate", "returns"), [(1, "tensor"), (2, "dict"), (4, "tensor")])
def test_gradient_matches_hand_written_loss(
    accumulate: int, returns: str, tokenizer: Any, tokens: Any
) -> None:
    """One optimizer step over the same 8 examples as 1x8, 2x4 or 4x2 micro-batches (each padded to its own
    length, unequal supervised counts): the gradient is that of the mean over micro-batches of
    CE + coef * penalty, i.e. the penalty is a per-micro-batch mean that Lightning divides like the loss."""
    rows = examples(tokenizer)
    capture = GradCapture()
    trainer = L.Trainer(
        **trainer_kwargs(
            callbacks=[STRCallback(training_positions({"coef": COEF}), tokens=tokens), capture],
            accumulate_grad_batches=accumulate,
        )
    )
    trainer.fit(LitLM(returns=returns), DataLoader(rows, batch_size=8 // accumulate, collate_fn=collate))
    assert len(capture.grads) == 1 and len(capture.batches) == accumulate
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in capture.batches]
    assert len(set(counts)) == len(counts), "micro-batches need unequal supervised counts"
    assert_grads_close(capture.grads[0], hand_written_grads(capture.batches, tokens, COEF))


@pytest.mark.parametrize(("accumulate", "decision_point"), [(1, False), (4, False), (4, True)])
def test_anchor_term_is_added_once_per_optimizer_step(
    accumulate: int, decision_point: bool, tokenizer: Any, tokens: Any
) -> None:
    """Source `anchors`: the anchor penalty is a per-optimizer-step mean; with the CE zeroed, the gradient of
    one optimizer step equals that of `handle.loss()` in plain PyTorch, whatever the accumulation (also with
    the decision-point methods)."""
    cfg = anchor_config("separate", decision_point=decision_point)
    capture = GradCapture()
    trainer = L.Trainer(
        **trainer_kwargs(
            callbacks=[STRCallback(cfg, tokenizer=tokenizer, tokens=tokens), capture],
            accumulate_grad_batches=accumulate,
        )
    )
    trainer.fit(
        LitLM(ce_scale=0.0), DataLoader(examples(tokenizer), batch_size=8 // accumulate, collate_fn=collate)
    )
    model = make_lora(make_model("llama"))
    model.train()
    with register_str_hook(model, cfg, tokenizer=tokenizer, tokens=tokens) as handle:
        handle.loss().backward()
    expected = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    assert_grads_close(capture.grads[0], expected)


@pytest.mark.parametrize(("accumulate", "decision_point"), [(1, False), (2, False), (2, True)])
def test_folded_anchors_give_the_separate_placements_gradient(
    accumulate: int, decision_point: bool, tokenizer: Any, tokens: Any
) -> None:
    """`anchor_placement: folded`: the callback folds the anchors into the first micro-batch of the step;
    CE + anchor term give the same optimizer-step gradient as a separate anchor forward; also with the
    decision-point methods (coarse KL over 3-token openings, benign anchors)."""
    grads = []
    for placement in ("separate", "folded"):
        cfg = anchor_config(placement, decision_point=decision_point)
        capture = GradCapture()
        trainer = L.Trainer(
            **trainer_kwargs(
                callbacks=[STRCallback(cfg, tokenizer=tokenizer, tokens=tokens), capture],
                accumulate_grad_batches=accumulate,
            )
        )
        trainer.fit(LitLM(), DataLoader(examples(tokenizer), batch_size=8 // accumulate, collate_fn=collate))
        grads.append(capture.grads[0])
    assert_grads_close(grads[1], grads[0])


def test_ddp_two_cpu_processes(tmp_path: Path, tokenizer: Any, tokens: Any) -> None:
    """strategy="ddp", 2 processes (gloo), micro-batch 4 per rank: the all-reduced gradient is the mean over
    the ranks of (CE + coef * penalty) per-rank means; with equal supervised counts per rank it equals one
    process with a batch of 8."""
    run_two_processes(WORKER, str(tmp_path))
    for order in ("unequal", "equal"):
        grads = torch.load(tmp_path / f"grads_{order}.pt", weights_only=True)
        halves = [torch.load(tmp_path / f"batch_{order}_rank{r}.pt", weights_only=True) for r in (0, 1)]
        counts = [int((h["labels"][:, 1:] != -100).sum()) for h in halves]
        assert (counts[0] == counts[1]) == (order == "equal"), counts
        assert_grads_close(grads, hand_written_grads(halves, tokens, COEF))
    # Equal counts per rank: the same gradient as one process, one batch of 8 (no accumulation).
    capture = GradCapture()
    callback = STRCallback(training_positions({"coef": COEF}), tokens=tokens)
    trainer = L.Trainer(**trainer_kwargs(callbacks=[callback, capture]))
    rows = ordered(examples(tokenizer), "equal")
    assert supervised_count(rows[0::2]) == supervised_count(rows[1::2])
    trainer.fit(LitLM(), DataLoader(rows, batch_size=8, collate_fn=collate))
    assert_grads_close(torch.load(tmp_path / "grads_equal.pt", weights_only=True), capture.grads[0])


# -- precision, metrics, probe ----------------------------------------------------------------------------
def test_bf16_mixed_on_cpu(tmp_path: Path, tokenizer: Any, tokens: Any) -> None:
    logger = CSVLogger(tmp_path, name="bf16", version=0)
    trainer = L.Trainer(
        **trainer_kwargs(
            callbacks=[STRCallback(training_positions({"coef": 0.5}), tokens=tokens)],
            precision="bf16-mixed",
            max_steps=3,
            logger=logger,
            log_every_n_steps=1,
        )
    )
    trainer.fit(
        LitLM(lr=1e-2, optimizer="adam"), DataLoader(examples(tokenizer), batch_size=4, collate_fn=collate)
    )
    rows = read_csv(logger)
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    for row in rows:
        for key in ("str/penalty", "str/drift", "str/abs_drift", "str/coef"):
            assert torch.isfinite(torch.tensor(float(row[key]))), (key, row)
        assert float(row["str/penalty"]) > 0 and float(row["str/coef"]) == 0.5


def test_metrics_and_refusal_probe(tmp_path: Path, tokenizer: Any, tokens: Any) -> None:
    """Metric names follow `logging.prefix`; the per-step penalty is the mean of the micro-batch terms; the
    probe logs a refusal rate every `probe.every` optimizer steps."""
    cfg = {
        "coef": 0.5,
        "logging": {"prefix": "safety/", "top_tokens": 2},
        "probe": {"every": 2, "n_prompts": 2, "max_new_tokens": 2},
    }
    logger = CSVLogger(tmp_path, name="probe", version=0)
    callback = STRCallback(cfg, tokenizer=tokenizer, tokens=tokens)
    trainer = L.Trainer(
        **trainer_kwargs(
            callbacks=[callback], max_steps=4, logger=logger, log_every_n_steps=1, accumulate_grad_batches=2
        )
    )
    trainer.fit(
        LitLM(lr=1e-2, optimizer="adam"), DataLoader(examples(tokenizer), batch_size=2, collate_fn=collate)
    )
    rows = read_csv(logger)
    assert callback.step_count == 4 and [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    assert {"safety/penalty", "safety/drift", "safety/abs_drift", "safety/coef"} <= rows[0].keys()
    assert sum(key.startswith("safety/drift/") for key in rows[0]) == 2
    probed = [int(r["step"]) for r in rows if r["safety/refusal_rate"]]
    assert probed == [1, 3]  # after the 2nd and the 4th optimizer step
    # The logged rate is the probe's own: its judged replies after the 4th step.
    assert callback.probe is not None and callback.probe.last is not None
    last = callback.probe.last
    assert len(last.responses) == 2
    assert float(rows[3]["safety/refusal_rate"]) == pytest.approx(sum(last.refused) / len(last.refused))


# -- resume ----------------------------------------------------------------------------------------------
def test_resume_gives_the_same_penalties(tmp_path: Path, tokenizer: Any, tokens: Any) -> None:
    """6 steps straight through equal 3 steps, a checkpoint, and a fresh Trainer resumed for the rest: the
    warm-up step comes back from the callback's state (without it, the resumed coef restarts at 0)."""
    # One batch per epoch: Lightning 2.6 resumes a checkpoint saved after the last batch of an epoch at
    # batch index n of that epoch, restarting a plain DataLoader, so with several batches per epoch the
    # resumed run would see them in another order (Lightning's doing, not the callback's).
    rows = examples(tokenizer, n=4)
    cfg = training_positions({"coef": 1.0, "warmup_steps": 4})

    def fit(
        name: str, max_steps: int, ckpt_path: Path | None = None
    ) -> tuple[L.Trainer, STRCallback, CSVLogger]:
        callback = STRCallback(cfg, tokens=tokens)
        logger = CSVLogger(tmp_path, name=name, version=0)
        trainer = L.Trainer(
            **trainer_kwargs(callbacks=[callback], max_steps=max_steps, logger=logger, log_every_n_steps=1)
        )
        loader = DataLoader(rows, batch_size=4, collate_fn=collate)
        trainer.fit(LitLM(lr=1e-2, optimizer="adam"), loader, ckpt_path=ckpt_path)
        return trainer, callback, logger

    _, straight, straight_log = fit("straight", 6)
    first, part_one, first_log = fit("first", 3)
    first.save_checkpoint(tmp_path / "step3.ckpt")
    assert part_one.state_dict()["handle"]["step"] == 3
    _, part_two, second_log = fit("second", 6, tmp_path / "step3.ckpt")
    assert straight.step_count == part_two.step_count == 6

    def penalties(*loggers: CSVLogger) -> dict[int, float]:
        return {int(r["step"]): float(r["str/penalty"]) for lg in loggers for r in read_csv(lg)}

    expected = penalties(straight_log)
    assert sorted(expected) == list(range(6)) and expected[0] == 0.0 and expected[3] > 0
    got = penalties(first_log, second_log)
    assert got.keys() == expected.keys()
    for step, value in expected.items():
        assert got[step] == pytest.approx(value, rel=1e-5, abs=1e-7), step


# -- efficacy --------------------------------------------------------------------------------------------
def test_penalty_reduces_drift(tokenizer: Any, tokens: Any) -> None:
    """From LoRA B = 0 (the start equals the reference), 20 Adam steps: coef 20 keeps the safety logits
    within a quarter of the drift that plain fine-tuning causes."""

    def final_abs_drift(coef: float) -> float:
        module = LitLM(lr=1e-2, optimizer="adam")
        with torch.no_grad():
            for name, param in module.named_parameters():
                if "lora_B" in name:
                    param.zero_()
        trainer = L.Trainer(
            **trainer_kwargs(
                callbacks=[STRCallback(training_positions({"coef": coef}), tokens=tokens)], max_steps=20
            )
        )
        trainer.fit(module, DataLoader(examples(tokenizer), batch_size=4, collate_fn=collate))
        return float(trainer.callback_metrics["str/abs_drift"])

    plain, regularized = final_abs_drift(0.0), final_abs_drift(20.0)
    assert plain > 0.3, plain
    assert regularized < 0.25 * plain, (regularized, plain)


# -- finding the model -----------------------------------------------------------------------------------
class Nested(L.LightningModule):
    """The causal LM two levels down, built in `configure_model` (after callbacks' `setup`)."""

    def __init__(self) -> None:
        super().__init__()
        self.net: torch.nn.ModuleDict | None = None

    def configure_model(self) -> None:
        if self.net is None:
            self.net = torch.nn.ModuleDict({"lm": make_lora(make_model("llama"))})

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        assert self.net is not None
        return self.net["lm"](**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.0)


@pytest.mark.parametrize("spec", [None, "net.lm", "callable"])
def test_model_built_in_configure_model_is_found(spec: Any, tokenizer: Any, tokens: Any) -> None:
    model_spec = (lambda m: m.net["lm"]) if spec == "callable" else spec
    capture = GradCapture()
    callback = STRCallback(training_positions({"coef": COEF}), tokens=tokens, model=model_spec)
    trainer = L.Trainer(**trainer_kwargs(callbacks=[callback, capture]))
    trainer.fit(Nested(), DataLoader(examples(tokenizer), batch_size=8, collate_fn=collate))
    grads = {name.removeprefix("net.lm."): g for name, g in capture.grads[0].items()}
    assert_grads_close(grads, hand_written_grads(capture.batches, tokens, COEF))
    assert callback.step_count == 1


# -- errors ----------------------------------------------------------------------------------------------
class NoLM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 4)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.layer(batch).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_training_step_must_return_the_loss(tokenizer: Any, tokens: Any) -> None:
    module = LitLM(returns="none")
    counts = hook_counts(module)
    trainer = L.Trainer(**trainer_kwargs(callbacks=[STRCallback(training_positions(), tokens=tokens)]))
    with pytest.raises(STRError, match=r"LitLM.training_step returned NoneType.*must return the loss"):
        trainer.fit(module, DataLoader(examples(tokenizer), batch_size=4, collate_fn=collate))
    assert "training_step" not in module.__dict__ and hook_counts(module) == counts


def test_module_without_a_causal_lm(tokens: Any) -> None:
    trainer = L.Trainer(**trainer_kwargs(callbacks=[STRCallback(tokens=tokens)]))
    with pytest.raises(STRAttachError, match=r"could not find the causal LM inside NoLM.*Pass `model=`"):
        trainer.fit(NoLM(), DataLoader(torch.randn(8, 4), batch_size=4))


def test_wrong_model_path(tokens: Any) -> None:
    trainer = L.Trainer(**trainer_kwargs(callbacks=[STRCallback(tokens=tokens, model="nope.path")]))
    with pytest.raises(STRAttachError, match=r"`model='nope.path'`: LitLM has no attribute path 'nope.path'"):
        trainer.fit(LitLM(), DataLoader(torch.randn(8, 4), batch_size=4))


def test_manual_optimization_is_refused(tokens: Any) -> None:
    module = LitLM()
    module.automatic_optimization = False
    trainer = L.Trainer(**trainer_kwargs(callbacks=[STRCallback(tokens=tokens)]))
    with pytest.raises(STRAttachError, match="manual optimization"):
        trainer.fit(module, DataLoader(torch.randn(8, 4), batch_size=4))


def test_arguments_are_checked_at_construction(tokens: Any) -> None:
    with pytest.raises(STRConfigError, match=r"`probe.every` is 5.*no tokenizer"):
        STRCallback({"probe": {"every": 5}}, tokens=tokens)
    with pytest.raises(ValueError, match="coeff"):  # pydantic: unknown key, with a did-you-mean hint
        STRCallback({"coeff": 1.0}, tokens=tokens)
    with pytest.raises(STRConfigError, match="no safety tokens and no tokenizer"):
        STRCallback({"coef": 1.0})
    with pytest.raises(TypeError, match="`model` must be"):
        STRCallback(tokens=tokens, model=3)  # type: ignore[arg-type]


def test_missing_lightning_gives_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    monkeypatch.setitem(sys.modules, "lightning", None)  # makes `import lightning` raise ImportError
    monkeypatch.delitem(sys.modules, "str_hooks.integrations.lightning")
    with pytest.raises(ImportError, match=r'pip install -e "\.\[lightning\]"'):
        importlib.import_module("str_hooks.integrations.lightning")


# -- teardown --------------------------------------------------------------------------------------------
def test_teardown_after_fit_after_an_exception_and_fitting_twice(tokenizer: Any, tokens: Any) -> None:
    module = LitLM(lr=1e-3)
    counts = hook_counts(module)
    callback = STRCallback(training_positions({"coef": 0.5}), tokens=tokens)
    loader = DataLoader(examples(tokenizer), batch_size=4, collate_fn=collate)

    L.Trainer(**trainer_kwargs(callbacks=[callback], max_steps=2)).fit(module, loader)
    assert "training_step" not in module.__dict__ and hook_counts(module) == counts
    assert callback.handle is None and callback.step_count == 2

    # A second fit with the same callback attaches again and continues the step count.
    L.Trainer(**trainer_kwargs(callbacks=[callback], max_steps=1)).fit(module, loader)
    assert callback.step_count == 3 and hook_counts(module) == counts

    module.fail_at = 1
    with pytest.raises(RuntimeError, match="boom inside training_step"):
        L.Trainer(**trainer_kwargs(callbacks=[callback], max_steps=4)).fit(module, loader)
    assert "training_step" not in module.__dict__ and hook_counts(module) == counts
    assert callback.handle is None and not hasattr(module.model.get_base_model(), "_str_hooks_handle")
    assert type(module).training_step is LitLM.training_step
