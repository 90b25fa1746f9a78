"""Fine-tuning: the train state and the pure steps, losses, the optimizer, metrics, early stopping, the loop, the
job's set-up, checkpoints and resume, preemption, the run directory and what a run logs."""
