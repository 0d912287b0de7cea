"""Pre-training data curation on datatrove (the paper, section 3.1): raw documents in, curated JSONL out."""
