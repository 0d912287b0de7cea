"""``python -m evaluation [lm_eval flags]``: lm-eval's CLI with this project's ``llama3herd`` model registered."""

from evaluation.harness import main

main()
