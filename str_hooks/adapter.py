"""What the trainer adapters share beyond the `StepDriver`: `AdapterBase` (the options they attach with, attach
and detach, the state resumed across them, the host methods they patch) and two helpers, `patch_method`
(shadow one host method on an instance, reversibly: how an adapter reaches a loss no callback may change)
and `find_caller` (find a host that never hands itself to its callbacks)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypedDict

from torch import nn
from typing_extensions import Unpack

from str_hooks.attach import register_str_hook
from str_hooks.driver import StepDriver
from str_hooks.handle import STRHandle
from str_hooks.modules import ModuleSpec
from str_hooks.probe import ProbeRunner
from str_hooks.schemas.config import STRConfig
from str_hooks.schemas.load import load_config
from str_hooks.tokens import SafetyTokens

# Set on a function `patch_method` put on an instance: the adapter that owns it.
PATCHED_ATTR = "_str_hooks_patched_by"
# What an adapter's `config` argument may be (None: the defaults).
ConfigLike = STRConfig | dict[str, Any] | str | Path | None


class AttachOptions(TypedDict, total=False):
    """The `register_str_hook` options an adapter is built with and attaches with, each None when not given:
    the keyword arguments that `AdapterBase`, the Lightning `STRCallback` and `hf.attach` all take."""

    tokenizer: Any
    tokens: SafetyTokens | None
    reference_model: nn.Module | None
    decoder: ModuleSpec
    head: ModuleSpec


def check_options(options: Mapping[str, object], caller: str) -> None:
    """The `TypeError` Python raises for an unknown keyword of `caller` (a function's qualified name), for one
    that takes `**options: Unpack[AttachOptions]`."""
    for key in options:
        if key not in AttachOptions.__optional_keys__:
            raise TypeError(f"{caller}() got an unexpected keyword argument {key!r}")


class AdapterBase:
    """Base of the trainer adapters: the validated config and the `register_str_hook` options as given, the
    `StepDriver` while attached, and the state that the next attach resumes from.

    Args:
        config: an `STRConfig`, a dict, a YAML/JSON path, or None for the defaults (validated here).
        tokenizer, tokens, reference_model, decoder, head: as for `register_str_hook`.
    """

    def __init__(self, config: ConfigLike = None, **options: Unpack[AttachOptions]) -> None:
        check_options(options, "AdapterBase.__init__")
        super().__init__()
        self.config = load_config(config if config is not None else STRConfig())
        self.tokenizer: Any = options.get("tokenizer")
        self.tokens: SafetyTokens | None = options.get("tokens")
        self.reference_model: nn.Module | None = options.get("reference_model")
        self.decoder: ModuleSpec = options.get("decoder")
        self.head: ModuleSpec = options.get("head")
        self.driver: StepDriver | None = None
        self._undo: list[Callable[[], None]] = []  # the patches `detach_driver` takes back
        self.probe: ProbeRunner | None = None  # the refusal probe (`build_probe`), run by the driver
        # What the next attach resumes from: a checkpoint's state, or the last detach's.
        self.pending_state: dict[str, Any] | None = None

    @property
    def handle(self) -> STRHandle | None:
        """The attached `STRHandle` during training, None outside it."""
        return self.driver.handle if self.driver is not None else None

    @property
    def step_count(self) -> int:
        """Optimizer steps seen (drives the coef warm-up and the anchor schedule); kept across attaches."""
        if self.driver is not None:
            return self.driver.handle.step_count
        return int((self.pending_state or {}).get("step", 0))

    def attach_driver(
        self, model: nn.Module, tokenizer: Any, *, tokens_from_state: bool = False
    ) -> StepDriver:
        """Attach STR to `model` with these options and `tokenizer`, resumed from `pending_state`, driven with
        `probe`; nothing stays attached when resuming fails. `tokens_from_state`: without `tokens`, take the
        pending state's (a checkpoint's run is never re-mined)."""
        state, tokens = self.pending_state, self.tokens
        if tokens is None and tokens_from_state and state:
            tokens = SafetyTokens.from_dict(state["tokens"], source="the checkpoint's STR state")
        handle = register_str_hook(
            model,
            self.config,
            tokens=tokens,
            tokenizer=tokenizer,
            reference_model=self.reference_model,
            decoder=self.decoder,
            head=self.head,
        )
        try:
            if state is not None:
                handle.load_state_dict(state)
        except BaseException:
            handle.remove()
            raise
        self.pending_state = None
        self.driver = StepDriver(handle, self.probe)
        return self.driver

    def patch(self, obj: Any, name: str, wrapper: Callable[..., Any]) -> None:
        """`patch_method(obj, name, wrapper, self)`, taken back by the next `detach_driver()`."""
        self._undo.append(patch_method(obj, name, wrapper, self))

    def detach_driver(self) -> None:
        """Take back this adapter's patches and remove the hook, keeping its state in `pending_state` (a later
        attach continues from its step). Safe to call twice."""
        undo, self._undo = self._undo, []
        for take_back in reversed(undo):
            take_back()
        driver, self.driver = self.driver, None
        if driver is not None:
            self.pending_state = driver.state_dict()
            driver.handle.remove()

    def state_dict(self) -> dict[str, Any]:
        """The resumable state (Lightning's callback contract): `{"handle": ...}` from the attached handle or
        the pending state, `{}` when there is none."""
        state = self.driver.state_dict() if self.driver is not None else self.pending_state
        return {"handle": state} if state is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from `state_dict()`'s output: now when attached, else at the next attach (hosts restore state
        before or after they attach)."""
        state = state_dict.get("handle")
        if state is None:
            return
        if self.driver is not None:
            self.driver.load_state_dict(state)
        else:
            self.pending_state = dict(state)


def patch_method(obj: Any, name: str, wrapper: Callable[..., Any], owner: object) -> Callable[[], None]:
    """Shadow `obj.<name>` on this instance with `wrapper`, marked as `owner`'s (`patched_by`).

    Returns:
        The undo: while `wrapper` is still in place, it puts back what the instance held before (or
        removes the shadow, so the class's method is found again). Safe to call twice.
    """
    previous = vars(obj).get(name)
    setattr(wrapper, PATCHED_ATTR, owner)
    setattr(obj, name, wrapper)

    def undo() -> None:
        if vars(obj).get(name) is wrapper:
            if previous is not None:
                setattr(obj, name, previous)
            else:
                delattr(obj, name)

    return undo


def patched_by(obj: Any, name: str) -> Any:
    """The owner that `patch_method` marked on `obj.<name>`, None when not patched."""
    return getattr(getattr(obj, name, None), PATCHED_ATTR, None)


def find_caller(kind: type, accepts: Callable[[Any], bool]) -> Any:
    """The first `self` up the call stack that is a `kind` and that `accepts` (None when none is): how a
    callback finds the host that never hands itself to it."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            found = frame.f_locals.get("self")
            if isinstance(found, kind) and accepts(found):
                return found
            frame = frame.f_back
    finally:
        del frame
    return None


__all__ = [
    "PATCHED_ATTR",
    "AdapterBase",
    "AttachOptions",
    "ConfigLike",
    "check_options",
    "find_caller",
    "patch_method",
    "patched_by",
]
