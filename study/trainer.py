"""The Trainer parts of a study run: step timing with the refusal probe, KL-regularized SFT, peak memory,
and the batch collator."""

from __future__ import annotations

import ctypes
import gc
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import psutil
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback

from str_hooks.testing import pad_rows


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step, and the refusal rate every `every` steps (not timed); with
    `skip_last`, not at the run's last step (the caller's final evaluation supplies that point)."""

    def __init__(self, probe: Any, every: int, skip_last: bool = False) -> None:
        self.step_times: list[float] = []
        self.curve: list[tuple[int, float]] = []
        self.probe = probe
        self.every = every
        self.skip_last = skip_last
        self._start = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step_times.append(time.perf_counter() - self._start)
        last = self.skip_last and state.global_step == state.max_steps
        if self.every and state.global_step % self.every == 0 and not last:
            self.curve.append((state.global_step, self.probe(state.global_step)))


class CheckpointEval(TrainerCallback):
    """Calls `evaluate(step)` after the optimizer steps in `steps` (not timed: it runs after StepTimer's end)."""

    def __init__(self, steps: Sequence[int], evaluate: Any) -> None:
        self.steps = set(steps)
        self.evaluate = evaluate

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step in self.steps:
            self.evaluate(state.global_step)


class StepBar(TrainerCallback):
    """A progress bar over a run's optimizer steps (with its ETA), for runs a person waits on."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.bar: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.bar = tqdm(total=state.max_steps, desc=self.desc, unit="step")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.bar.update(1)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.bar.close()


class KLTrainer(Trainer):
    """KL-regularized SFT: CE + beta * KL(p_ref || p_theta) over the full vocabulary at supervised positions."""

    def __init__(self, *args: Any, beta: float, reference: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.beta = beta
        self.reference = reference

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        labels = inputs["labels"]
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        logits = outputs.logits[:, :-1].float()
        target = labels[:, 1:]
        keep = target != -100
        ce = F.cross_entropy(logits[keep], target[keep])
        with torch.no_grad():
            if self.reference is None:
                with model.disable_adapter():
                    ref = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            else:
                ref = self.reference(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
                ).logits
            ref_logp = torch.log_softmax(ref[:, :-1].float()[keep], dim=-1)
        logp = torch.log_softmax(logits[keep], dim=-1)
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()
        loss = ce + self.beta * kl
        return (loss, outputs) if return_outputs else loss


class PeakRSS:
    """Peak resident memory above the level at start, sampled every 5 ms (CPU runs have no allocator
    statistics like torch.cuda.max_memory_allocated; this is coarse)."""

    def __enter__(self) -> PeakRSS:
        # Freed memory a previous run left in the heap would absorb this run's growth (the first run of a
        # process then reports more than the next ones): hand it back to the OS before taking the base.
        gc.collect()
        if sys.platform.startswith("linux"):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.process = psutil.Process()
        self.base = self.process.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def delta_mib(self) -> float:
        return (self.peak - self.base) / 2**20


class Collator:
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return pad_rows(rows, self.pad_id)
