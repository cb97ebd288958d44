"""Training: the accelerate-based loop, checkpoints with exact resume, schedules, metrics."""
