"""Fine-tuning recipes on top of any timm backbone: re-ID (:mod:`vzoo.tasks.reid`), detection
(:mod:`vzoo.tasks.detection`) and answer grounding (:mod:`vzoo.tasks.grounding`), sharing one trainer
(:mod:`vzoo.tasks.trainer`)."""
