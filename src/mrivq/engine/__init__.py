"""Training and evaluation machinery: one optimisation step, the loop both trainers use, the
evaluator, checkpoints, torchrun."""
