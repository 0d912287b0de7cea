"""The reward model's architecture: a Llama 3 whose output is a score head read at the last token, equal to HF's
LlamaForSequenceClassification (num_labels=1) on the same weights, through both checkpoint layouts."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from transformers import LlamaForSequenceClassification

from lm import load_pretrained, save_pretrained
from lm.config import LMConfig
from lm.generate import generate
from lm.reward import score_sequences

ROWS = [[5, 17, 300, 42, 7], [9, 3], [11, 12, 13, 14, 15, 16, 17, 18, 19], [401]]


@pytest.mark.parametrize("layout", ["hf", "meta"])
def test_scores_equal_transformers_sequence_classification(tmp_path, layout):
    rm = tiny_model(seed=3, num_labels=1)
    assert rm.output.weight.shape == (1, rm.config.dim)
    ours = score_sequences(rm, ROWS, batch_size=3)  # batches of mixed lengths: padding must not leak in
    assert ours.shape == (len(ROWS),)
    one_by_one = torch.stack([score_sequences(rm, [row])[0] for row in ROWS])
    torch.testing.assert_close(ours, one_by_one, rtol=1e-5, atol=1e-6)

    save_pretrained(rm, tmp_path / "hf", format="hf")
    hf = LlamaForSequenceClassification.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert hf.config.num_labels == 1
    with torch.no_grad():
        theirs = torch.stack([hf(torch.tensor([row])).logits[0, 0] for row in ROWS])
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)

    save_pretrained(rm, tmp_path / layout, format=layout)
    loaded = load_pretrained(tmp_path / layout)
    assert loaded.config.num_labels == 1
    torch.testing.assert_close(score_sequences(loaded, ROWS, batch_size=3), ours, rtol=0, atol=0)


def test_a_language_model_is_not_scored_and_configs_are_checked(tmp_path):
    with pytest.raises(ValueError, match="no score head"):
        score_sequences(tiny_model(), ROWS)
    with pytest.raises(ValueError, match="num_labels"):
        LMConfig(num_labels=-1)
    with pytest.raises(ValueError, match="tied"):
        LMConfig(num_labels=1, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="reward model"):
        generate(tiny_model(num_labels=1), None, [1, 2, 3], max_new_tokens=2)
    with pytest.raises(ValueError, match="empty"):
        score_sequences(tiny_model(num_labels=1), [[1, 2], []])
    # A reward model's checkpoint is not an LM's: loading one as the other fails naming the weight.
    save_pretrained(tiny_model(num_labels=1), tmp_path / "rm")
    cfg = LMConfig.from_hf_config(tmp_path / "rm" / "config.json")
    assert (cfg.num_labels, cfg.output_dim) == (1, 1)
    assert LMConfig.from_hf_config({**cfg.to_hf_config(), "architectures": ["LlamaForCausalLM"]}).num_labels == 0
