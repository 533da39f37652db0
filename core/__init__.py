"""Foundations every process shares: settings, the NATS runtime and its subjects, heartbeats and the pool view,
the image reader, tracing and metrics. gateway/ and workers/ import these; they import neither."""
