"""Training: the GLM blank-infilling objective (glm_objective.py), data and collation (data.py), the loop
with checkpoints and torch.distributed (trainer.py), LoRA in PEFT's format (lora.py), P-tuning v2
(ptuning.py) and HF-layout export (export.py). Nothing here serves or samples."""
