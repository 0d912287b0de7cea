"""What the embedded default's task YAMLs name with ``!function`` (lm-eval imports this file by its path)."""

from evaluation.tasks import grade_math, grade_translation, load_rows

__all__ = ["grade_math", "grade_translation", "load_rows"]
