"""STR with the Hugging Face Trainer (TRL's SFTTrainer works the same way; runs on CPU in seconds).

python examples/hf_trainer.py
"""

from __future__ import annotations

import tempfile

from transformers import Trainer, TrainingArguments

from str_hooks.integrations.hf import attach
from str_hooks.testing import make_batch, make_lora, make_model, make_tokenizer

tok = make_tokenizer()
model = make_lora(make_model("llama"))
batch = make_batch(tok, n=8)
rows = [{key: value[i] for key, value in batch.items()} for i in range(8)]  # padded tensors: any collator
args = TrainingArguments(
    output_dir=tempfile.mkdtemp(),
    per_device_train_batch_size=2,
    gradient_accumulation_steps=2,
    max_steps=2,
    logging_steps=1,
    report_to=[],
    use_cpu=True,
)
trainer = Trainer(model=model, args=args, train_dataset=rows)
attach(trainer, {"coef": 0.1, "probe": {"every": 2, "n_prompts": 2, "max_new_tokens": 4}}, tokenizer=tok)
trainer.train()
for entry in trainer.state.log_history:
    print({k: v for k, v in entry.items() if k.startswith("str/") or k in ("step", "loss")})
