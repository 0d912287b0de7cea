"""Scoring models: the lm-evaluation-harness backend (harness) and the embedded default's own tasks (tasks)."""
