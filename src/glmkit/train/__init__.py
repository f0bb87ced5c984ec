"""Training: the GLM blank-infilling objective (glm_objective.py) today; chat fine-tuning, LoRA and
multi-process runs arrive with the training issue."""
