"""The research code: `python -m study ...` (study/__main__.py) runs each study.

- Methods: `methods.py` (METHODS, every named setting, the pre-change settings pinned once); one run of a
  method: `finetune.py` (run_one), with `trainer.py` (Trainer parts) and `evaluation.py` (validation).
- Data: `data.py` (the aligned model's data, ../shared/data readers), `texts.py` (the project's texts),
  `tasks.py` (fine-tuning tasks), `distances.py` (word-Jaccard between prompt sets).
- Models: `subject.py` (the real aligned subject), `model.py` (the toy model, generation and judging).
- Studies: `real.py` (efficacy), `decision.py` + `decision_run.py` + `decision_report.py` (issue 12),
  `harmful_mixing.py` (the plan) + `harmful_sources.py` + `harmful_run.py` + `harmful_report.py` (issue 26),
  `step_cost.py`, `toy.py`; `report.py` (the real and toy reports); `runs.py` (runs.jsonl bookkeeping).
"""
