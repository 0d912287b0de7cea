"""train.average: the weighted mean of checkpoints, checked input against input, written as one checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import save_run, tiny_model
from safetensors.torch import load_file, save_file

from data.chat import IGNORE_INDEX, encode_dialog, pack_dialogs
from data.instruct import make_dialogs
from lm import Transformer, load_pretrained, save_pretrained
from lm.generate import generate
from lm.tokenizer import ChatFormat, Tokenizer
from train.average import AverageError, average_state_dicts, main, normalized_weights

PROMPTS = [[1, 5, 9, 200], [3, 3, 7, 11, 400, 2]]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Tiny shapes: one intra-op thread is faster on the shared 2-core machine."""


def _saved(path: Path, model: torch.nn.Module, **kwargs) -> Path:
    save_pretrained(model, path, **kwargs)
    return path


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_pretrained(path).state_dict()


def test_self_average_is_bit_identical_and_generates_the_same(tmp_path):
    model = tiny_model(seed=0)
    source = _saved(tmp_path / "a", model)
    copy = shutil.copytree(source, tmp_path / "b")
    assert main([str(tmp_path / "avg"), str(source), str(copy)]) == 0
    averaged = load_pretrained(tmp_path / "avg")
    for key, tensor in model.state_dict().items():
        assert torch.equal(averaged.state_dict()[key], tensor), key
    settings = dict(max_new_tokens=12, temperature=0.0)
    assert generate(averaged, None, PROMPTS, **settings) == generate(model, None, PROMPTS, **settings)


def test_average_is_the_weighted_elementwise_mean(tmp_path):
    first, second = tiny_model(seed=0), tiny_model(seed=1)
    a = _saved(tmp_path / "a", first, format="meta")
    b = _saved(tmp_path / "b", second)  # the layouts may differ: names and rotary order are read back as Meta's
    assert main([str(tmp_path / "avg"), str(a), str(b), "--weights", "3,1", "--format", "meta"]) == 0
    averaged = _state(tmp_path / "avg")
    expected = {k: (3 * v + second.state_dict()[k]) / 4 for k, v in first.state_dict().items()}
    assert averaged.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(averaged[key], expected[key], rtol=1e-6, atol=1e-7)
        assert not torch.equal(averaged[key], first.state_dict()[key]) or key.endswith("norm.weight")


def test_bf16_inputs_give_a_bf16_average(tmp_path):
    first, second = tiny_model(seed=0).bfloat16(), tiny_model(seed=1).bfloat16()
    paths = [_saved(tmp_path / "a", first), _saved(tmp_path / "b", second)]
    averaged = average_state_dicts(paths, None)
    key = "layers.0.feed_forward.w1.weight"
    assert averaged[key].dtype == torch.bfloat16
    exact = (first.state_dict()[key].float() + second.state_dict()[key].float()) / 2
    assert torch.equal(averaged[key], exact.bfloat16())


def test_weights_are_relative_and_checked():
    assert normalized_weights([2, 1], 2) == pytest.approx([2 / 3, 1 / 3])
    assert normalized_weights(None, 4) == [0.25] * 4
    for bad, message in (([1, -1], "non-negative"), ([0, 0], "not all 0"), ([1, 1, 1], "3 weights for 2 inputs")):
        with pytest.raises(AverageError, match=message):
            normalized_weights(bad, 2)


def test_mismatched_configs_and_shapes_name_the_file_and_key(tmp_path, capsys):
    a = _saved(tmp_path / "a", tiny_model(seed=0))
    wider = _saved(tmp_path / "wider", tiny_model(seed=0, multiple_of=128))
    assert main([str(tmp_path / "x"), str(a), str(wider)]) == 2
    error = capsys.readouterr().err
    assert f"{wider}: config differs" in error and "intermediate_size" in error
    # A weight file whose tensor no longer fits its config.json: the file and the key are named.
    broken = shutil.copytree(a, tmp_path / "broken")
    tensors = load_file(broken / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:-1].clone()
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(AverageError, match=rf"{broken}: norm.weight has shape \(63,\)"):
        average_state_dicts([a, broken], None)
    assert not (tmp_path / "x").exists()


def test_reward_models_average_like_language_models(tmp_path):
    first, second = tiny_model(seed=0, num_labels=1), tiny_model(seed=1, num_labels=1)
    a, b = _saved(tmp_path / "a", first), _saved(tmp_path / "b", second)
    assert main([str(tmp_path / "avg"), str(a), str(b)]) == 0
    stored = load_file(tmp_path / "avg" / "model.safetensors")
    assert stored["score.weight"].shape == (1, 64)
    expected = (first.output.weight + second.output.weight).detach() / 2
    torch.testing.assert_close(stored["score.weight"], expected)
    # A reward model is not averaged with a language model: their configs differ (the head's width).
    plain = _saved(tmp_path / "plain", tiny_model(seed=3))
    with pytest.raises(AverageError, match=rf"{plain}: config differs from the first input {a}: architectures"):
        average_state_dicts([a, plain], None)


def test_run_dir_input_and_overwrite(tmp_path, capsys):
    """A run's newest DCP checkpoint averages with an HF checkpoint; OUT is replaced only with --overwrite."""
    trained = tiny_model(seed=4)
    run_dir = tmp_path / "run"
    save_run(trained, run_dir)
    other = tiny_model(seed=5)
    hf = _saved(tmp_path / "hf", other)
    out = tmp_path / "avg"
    out.mkdir()
    assert main([str(out), str(run_dir), str(hf)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main([str(out), str(run_dir), str(hf), "--overwrite"]) == 0
    averaged = _state(out)
    for key, tensor in trained.state_dict().items():
        torch.testing.assert_close(averaged[key], (tensor + other.state_dict()[key]) / 2)


# ---- learning: the average of two fine-tunes from one start is no worse than the worse of them ----------------


def _sft_rows(count: int, seed: int, vocabulary: dict[int, int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Packed instruction dialogs, token ids renumbered into the few hundred the dialogs use (a tiny vocabulary)."""
    chat = ChatFormat(Tokenizer())
    dialogs = [encode_dialog(d["messages"], chat) for d in make_dialogs(count, seed)]
    dialogs = [d for d in dialogs if len(d.ids) <= 96]  # as the readers drop over-long dialogs
    rows = []
    for ids, labels, _ in pack_dialogs(dialogs, width=96, seed=seed):
        ids = [vocabulary.setdefault(i, len(vocabulary)) for i in ids]
        labels = [IGNORE_INDEX if t == IGNORE_INDEX else vocabulary.setdefault(t, len(vocabulary)) for t in labels]
        rows.append((torch.tensor(ids), torch.tensor(labels)))
    return rows


def _answer_loss(model: Transformer, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    ids, labels = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


def _finetune(start: dict, rows: list, seed: int, steps: int = 12) -> Transformer:
    model = tiny_model(seed=0, vocab_size=1024).train()
    model.load_state_dict(start)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    for step in range(steps):
        batch = [rows[order[(step * 4 + i) % len(rows)]] for i in range(4)]
        optimizer.zero_grad()
        _answer_loss(model, batch).backward()
        optimizer.step()
    return model.eval()


def test_average_of_two_finetunes_is_no_worse_than_the_worse(tmp_path):
    vocabulary: dict[int, int] = {}
    train, heldout = _sft_rows(160, seed=0, vocabulary=vocabulary), _sft_rows(40, seed=1, vocabulary=vocabulary)
    assert len(vocabulary) <= 1024
    base = tiny_model(seed=0, vocab_size=1024)
    runs = [_finetune(base.state_dict(), train, seed) for seed in (1, 2)]
    paths = [_saved(tmp_path / f"sft{i}", model) for i, model in enumerate(runs)]
    averaged = tiny_model(seed=0, vocab_size=1024)
    averaged.load_state_dict(average_state_dicts(paths, None))
    with torch.no_grad():
        base_loss, averaged_loss = _answer_loss(base, heldout), _answer_loss(averaged, heldout)
        losses = [_answer_loss(model, heldout) for model in runs]
    assert max(losses) < base_loss - 1.0  # both runs learned
    assert averaged_loss <= max(losses), (averaged_loss, losses)
    assert not torch.equal(runs[0].output.weight, runs[1].output.weight)
