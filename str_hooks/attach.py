"""`register_str_hook`: everything that happens once, when STR attaches to a model (the config, the safety
tokens, the hooks, the reference source, and the checks that the projection and folding are exact)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from str_hooks.anchors import AnchorSet, end_token_ids
from str_hooks.cache import ReferenceCache, model_fingerprint
from str_hooks.errors import STRAttachError
from str_hooks.folding import fold_anchors
from str_hooks.handle import ATTACHED_ATTR, Attachment, STRHandle
from str_hooks.mining import mine_as_configured
from str_hooks.modules import ModuleSpec, peft_model_of, unwrap_model
from str_hooks.penalty import COARSE_FORMS
from str_hooks.prefix import worth_sharing
from str_hooks.reference import (
    AdapterReference,
    CacheReference,
    ModelReference,
    load_reference_model,
)
from str_hooks.schemas.config import STRConfig
from str_hooks.schemas.load import load_config
from str_hooks.tap import ModelTap, eval_mode, logits_close
from str_hooks.tokens import SafetyTokens


def register_str_hook(
    model: nn.Module,
    config: STRConfig | dict[str, Any] | str | Path | None = None,
    *,
    tokens: SafetyTokens | None = None,
    tokenizer: Any = None,
    reference_model: nn.Module | None = None,
    decoder: ModuleSpec = None,
    head: ModuleSpec = None,
) -> STRHandle:
    """Attach Safety Token Regularization to a causal LM. Call it after PEFT wrapping.

    Args:
        model: the model being fine-tuned (plain `*ForCausalLM`, PEFT model, or a DDP/FSDP wrapper).
        config: an `STRConfig`, a dict, a YAML/JSON path, or None for the defaults.
        tokens: safety tokens; None mines them with `tokenizer` as `config.tokens` says (or loads
            `config.tokens.path`).
        tokenizer: the model's tokenizer (needed to mine, for anchors, and to check a token file).
        reference_model: the frozen aligned model, for `reference.source: model`.
        decoder, head: overrides when they cannot be found (module, attribute path, or callable).

    Returns:
        The attached `STRHandle`.

    Raises:
        STRConfigError: the config is invalid.
        STRAttachError: already attached, no decoder/head, `adapter` source on a model without adapters,
            `logprob` on a model that builds no logits, a projection that does not match the logits.
        STRTokensError, STRCacheError: bad tokens or cache.

    Example:
        >>> handle = register_str_hook(model, {"coef": 0.1}, tokenizer=tok)  # doctest: +SKIP
        >>> out = model(input_ids=ids, attention_mask=mask, labels=labels)  # doctest: +SKIP
        >>> (out.loss + handle.loss()).backward()  # doctest: +SKIP
    """
    cfg = load_config(config if config is not None else STRConfig())
    causal_lm = unwrap_model(model)
    if getattr(causal_lm, ATTACHED_ATTR, None) is not None:
        raise STRAttachError(
            f"{type(causal_lm).__name__} already has an STR hook attached; call handle.remove() on it "
            "before attaching another."
        )
    peft_model = peft_model_of(model)
    source = cfg.reference.source
    if cfg.reference.rows == "adapter" and peft_model is None:
        raise STRAttachError(
            f"`reference.rows` is 'adapter' but {type(model).__name__} has no PEFT adapters to disable for the "
            "rows' reference (full fine-tuning?): wrap it with peft.get_peft_model first, or remove "
            "`reference.rows` (anchors only)."
        )
    if source == "adapter" and peft_model is None:
        raise STRAttachError(
            f"`reference.source` is 'adapter' but {type(model).__name__} has no PEFT adapters to disable: wrap "
            "it with peft.get_peft_model first, or use source 'model' (with reference_model=...), 'cache' or "
            "'anchors'."
        )
    if reference_model is None and cfg.reference.model_path is not None:
        reference_model = load_reference_model(cfg.reference.model_path, "`reference.model_path`")
    if source == "model" and reference_model is None:
        raise STRAttachError(
            "`reference.source` is 'model' but no reference model was given: pass reference_model=... to "
            "register_str_hook or set `reference.model_path`."
        )
    if reference_model is not None and source != "model":
        raise STRAttachError(
            f"a reference_model was given but `reference.source` is {source!r}: set source 'model' to use it."
        )
    resolved = _resolve_tokens(cfg, model, peft_model, tokens, tokenizer)
    tap = ModelTap(model, resolved.ids, decoder=decoder, head=head, head_gradient=cfg.penalty.head_gradient)
    parts = Attachment(config=cfg, tokens=resolved, tap=tap, peft_model=peft_model)
    tap.attach()
    try:
        _build_reference(parts, tokenizer, reference_model)
    except BaseException:
        # Nothing is left behind when attaching fails.
        tap.detach()
        if parts.reference is not None:
            parts.reference.detach()
        raise
    return STRHandle(parts)


def _build_reference(parts: Attachment, tokenizer: Any, reference_model: nn.Module | None) -> None:
    config, tap, peft_model = parts.config, parts.tap, parts.peft_model
    source = config.reference.source
    form = config.penalty.form
    rows = config.reference.rows is not None
    full_softmax_at_training_positions = form in COARSE_FORMS and (source != "anchors" or rows)
    if config.verify_projection or full_softmax_at_training_positions:
        parts.projection_verified = _verify(tap, parts.tokens, strict=config.verify_projection)
    if full_softmax_at_training_positions and parts.projection_verified is None:
        raise STRAttachError(
            f"`penalty.form` is {form!r} at training positions{' (`reference.rows`)' if rows else ''} but "
            f"{type(tap.causal_lm).__name__}'s forward builds no logits (a fused cross-entropy kernel?): use form 'mse' or 'hinge', which project from "
            f"hidden states, or source 'anchors', which takes the {form!r} softmax at the anchors' positions "
            "only."
        )
    if full_softmax_at_training_positions and not config.penalty.head_gradient and tap.rows.is_trainable():
        raise STRAttachError(
            f"`penalty.head_gradient` is false but `penalty.form` {form!r} at training positions"
            f"{' (`reference.rows`)' if rows else ''} takes its values from the training forward's own logits, "
            "whose head the task trains: set `penalty.head_gradient: true`, or use form 'mse' or 'hinge' there "
            "(projected from hidden states), or freeze the head."
        )
    if source == "adapter":
        assert peft_model is not None  # checked by register_str_hook
        parts.reference = AdapterReference(tap, peft_model)
    elif source == "model":
        assert reference_model is not None  # checked by register_str_hook
        reference = ModelReference(ModelTap(reference_model, parts.tokens.ids))
        parts.reference = reference
        if config.verify_projection:
            _verify(reference.tap, parts.tokens, strict=True)
    elif source == "cache":
        assert config.reference.cache_path is not None  # the schema guarantees it
        cache = ReferenceCache(config.reference.cache_path)
        with _adapters_off(peft_model), torch.no_grad():
            cache.check_compatible(parts.tokens.ids, model_fingerprint(tap))
        parts.reference = CacheReference(cache, tap.device())
        parts.cache_identity = {"path": str(cache.path), "model_fingerprint": cache.model_fingerprint}
    else:
        if tokenizer is None:
            raise STRAttachError("`reference.source` 'anchors' needs the tokenizer: pass tokenizer=... .")
        settings = config.reference
        anchors = AnchorSet(
            tokenizer,
            settings.anchors_path,
            column=settings.anchors_column,
            batch_size=settings.anchor_batch_size,
            benign_prompts=settings.benign_anchors_path,
            benign_weight=settings.benign_weight,
        )
        coarse = form if form in COARSE_FORMS else None
        if settings.anchor_tokens > 1:
            ends = end_token_ids(tokenizer, tap.causal_lm)
            # The prefix is shared at attach whatever the step does (a no-grad forward saves its tokens on
            # any device); `no` turns every sharing off.
            share = settings.share_anchor_prefix != "no"
            anchors.build_openings(tap, peft_model, settings.anchor_tokens, ends, coarse, share)
        anchors.compute_reference(tap, peft_model, coarse)
        anchors.share_prefix = settings.anchor_placement == "separate" and worth_sharing(
            settings.share_anchor_prefix, anchors.prefix_length, anchors.batch_size, tap.device()
        )
        anchors.build_batches(tap.device())
        parts.anchors = anchors
        if config.reference.anchor_placement == "folded":
            _verify_folding(tap, anchors)
        else:
            anchors.verify_prefix_sharing(tap)
        if rows:
            assert peft_model is not None  # checked by register_str_hook
            parts.reference = AdapterReference(tap, peft_model)


def _resolve_tokens(
    config: STRConfig,
    model: nn.Module,
    peft_model: nn.Module | None,
    tokens: SafetyTokens | None,
    tokenizer: Any,
) -> SafetyTokens:
    cfg = config.tokens
    if tokens is not None:
        if tokenizer is not None:
            tokens.check_tokenizer(tokenizer)
        return tokens
    if cfg.path is not None:
        return SafetyTokens.load(cfg.path, tokenizer=tokenizer)
    if tokenizer is None:
        raise STRAttachError(
            "no safety tokens were given and no tokenizer to mine them with: pass tokens=... "
            "(from mine_safety_tokens or SafetyTokens.load), tokenizer=..., or set `tokens.path`."
        )
    mining_model = unwrap_model(model) if cfg.method == "contrastive" else None
    with _adapters_off(peft_model):
        return mine_as_configured(tokenizer, cfg, model=mining_model)


def _adapters_off(peft_model: Any) -> Any:
    return contextlib.nullcontext() if peft_model is None else peft_model.disable_adapter()


def _verify(tap: ModelTap, tokens: SafetyTokens, strict: bool) -> bool | None:
    """True when the projection matches the logits, None when the model builds none. With
    `strict=False` (only asking whether logits exist) a mismatch is not an error."""
    probe = (tokens.ids * 2)[:16]
    try:
        return tap.verify_projection(probe)
    except STRAttachError:
        if strict:
            raise
        return True


def _verify_folding(tap: ModelTap, anchors: AnchorSet) -> None:
    """Check once that folded anchors see only themselves: an anchor folded in front of another prompt
    must give the same decision logits as alone, and the prompt behind it the same logits as without it.
    Fails where the attention ignores packed position ids (transformers before packed-mask detection, or a
    custom attention)."""
    first, second = (0, 1) if len(anchors) > 1 else (0, 0)
    row = torch.tensor([anchors.encoded[second]], dtype=torch.long, device=tap.device())
    folded, where = fold_anchors(
        {"input_ids": row},
        [anchors.encoded[first]],
        [first],
        pad_token_id=anchors.pad_token_id,
        keep_logits=False,
        points=[anchors.points[first]],
    )
    with torch.no_grad(), eval_mode(tap.causal_lm):
        together = tap.run(**folded, **tap.lean_kwargs()).safety_logits
        alone_anchor = anchors.policy_values(tap, [first], coarse=None)
        alone_row = tap.run(input_ids=row, **tap.lean_kwargs()).safety_logits
    assert together is not None and alone_row is not None  # tap.run guarantees them
    prefix = where.input_ids.shape[1] - row.shape[1]
    pairs = [
        (together[where.rows, where.cols], alone_anchor),
        (together[:, prefix:], alone_row),
    ]
    for folded_logits, separate_logits in pairs:
        err, scale, close = logits_close(folded_logits, separate_logits, tap.rows.weight.dtype)
        if not close:
            raise STRAttachError(
                "`reference.anchor_placement` is 'folded' but an anchor folded in front of a prompt changes "
                f"the logits by {float(err):.4g} (max |logit| {float(scale):.4g}): "
                f"{type(tap.causal_lm).__name__}'s attention does not keep packed segments apart "
                "(transformers builds block-diagonal masks from position ids only in recent versions, "
                "and only without an attention mask). Set `reference.anchor_placement: separate`, or "
                "upgrade transformers."
            )


__all__ = ["register_str_hook"]
