"""The inference engine: a Scheduler (requests, slots, prefix reuse, stop rules, streamed text) driving a
ModelRunner (KV cache, positions, the model or its compiled step) through one StepInputs value per step.

It calls the pure model; it knows nothing about HTTP, the CLI, tokenizer files or chat formats.
"""
