"""STR in a plain PyTorch loop with gradient accumulation (runs on CPU in seconds with a tiny model).

    python examples/plain_pytorch.py

Swap the tiny model and tokenizer for your own (`AutoModelForCausalLM.from_pretrained(...)`, then
`peft.get_peft_model(...)`, then `model.train()`): nothing else changes.
"""

from __future__ import annotations

import torch

from str_hooks import register_str_hook
from str_hooks.testing import make_batch, make_lora, make_model, make_tokenizer

tok = make_tokenizer()
model = make_lora(make_model("llama")).train()
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
batches = [make_batch(tok, n=2, seed=i) for i in range(4)]
accum = 2  # micro-batches per optimizer step

# The defaults: the coarse KL at anchor prompts' 4-token openings, benign anchors too, coef 30 (the decision
# and harmful-mixing studies' choice; `{"reference": {"source": "adapter"}}` regularizes the training positions instead).
with register_str_hook(model, {}, tokenizer=tok) as handle:
    for step in range(len(batches) // accum):
        for batch in batches[step * accum : (step + 1) * accum]:
            batch = handle.prepare_batch(batch)  # folds anchors in when configured; else the batch itself
            out = model(**batch)
            loss = out.loss / accum + handle.loss(accumulation_steps=accum)
            loss.backward()
            if handle.term_computed:  # anchors: the step's first micro-batch; training positions: each one
                logged = handle.metrics()
        # The one host read per step, before the weights change: raises on bad input (and on NaN/inf under
        # `penalty.on_nonfinite: raise`); under `skip` it returns how many micro-batches were non-finite.
        if handle.check_step() == 0:
            optimizer.step()
        optimizer.zero_grad()
        handle.step()  # coef warm-up and the anchor schedule
        print(f"step {step + 1}: {logged}")
