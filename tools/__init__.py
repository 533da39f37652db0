"""Model tools outside the serving path: the tiny random-weight checkpoints tests build, the demo model's
trainer and the shapes it learns."""
