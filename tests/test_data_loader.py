"""The packing loader: packing and document ids, exact resume, world-size changes, disjointness, corruption, mixtures.

Test documents encode their identity in every token: document d's token t is d * 1000 + t, so any emitted
token says which document and offset it came from.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model

from data.loader import PackedLoader, merge_states
from data.mixture import Mixture, parse_weights
from data.shards import DataError, write_token_source
from lm.attention import document_positions

SEQ = 32


def make_source(directory: Path, docs: int = 300, shard_tokens: int = 4000, seed: int = 0, base: int = 0) -> Path:
    """A source of `docs` documents of 3..200 tokens; document d holds tokens (base + d) * 1000 + t."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 200, size=docs)
    write_token_source(
        directory,
        ((base + d) * 1000 + np.arange(n) for d, n in enumerate(lengths)),
        shard_tokens,
        tokenizer={"sha256": "test"},
    )
    return directory


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_source(tmp_path_factory.mktemp("src") / "general")


def take(loader: PackedLoader, n: int) -> list:
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def consumed_by_state(loader: PackedLoader, state: dict, source: Path) -> Counter:
    """The (document, offset) tokens a global state says were emitted in epoch 0, from its per-unit positions."""
    plan = loader._cfg.plans[0]
    offsets = np.cumsum([0] + [s["documents"] for s in plan.shards])
    lengths = _doc_lengths(source)
    out: Counter = Counter()
    position = np.asarray(state["sources"][plan.name]["position"]).reshape(-1, 3)
    for unit, (epoch, doc, tok) in enumerate(position):
        first = offsets[plan.unit_shard[unit]] + plan.unit_lo[unit]
        count = plan.unit_hi[unit] - plan.unit_lo[unit]
        full = count if epoch > 0 else doc
        for d in range(first, first + full):
            out.update((int(d) * 1000 + t) for t in range(lengths[d]))
        if epoch == 0:
            out.update((int(first + doc) * 1000 + t) for t in range(tok))
    return out


def _doc_lengths(source: Path) -> list[int]:
    from data.shards import iter_tar_documents, read_manifest

    lengths = []
    for shard in read_manifest(source)["shards"]:
        lengths.extend(len(tokens) for _, tokens in iter_tar_documents(source / shard["file"]))
    return lengths


def test_rows_pack_documents_with_ids(source):
    batches = take(PackedLoader(source, seq_len=SEQ, batch_size=4, min_units=8), 20)
    for batch in batches:
        assert batch.tokens.shape == (4, SEQ + 1) and batch.tokens.dtype == torch.int64
        assert batch.document_ids.shape == (4, SEQ + 1) and batch.document_ids.dtype == torch.int32
        doc = batch.tokens // 1000
        offset = batch.tokens % 1000
        # A new id exactly where the document changes; ids start at 0 in every row.
        assert torch.equal(batch.document_ids[:, 1:] != batch.document_ids[:, :-1], doc[:, 1:] != doc[:, :-1])
        assert (batch.document_ids[:, 0] == 0).all()
        # Inside a row, a document continues token by token; one that starts mid-row starts at its offset 0.
        same = doc[:, 1:] == doc[:, :-1]
        assert (offset[:, 1:][same] == offset[:, :-1][same] + 1).all()
        assert (offset[:, 1:][~same] == 0).all()
        # The LM's RoPE positions restart at each document start.
        positions = document_positions(batch.document_ids)
        assert (positions[:, 1:][~same] == 0).all()
    # Documents continue across rows of the same reader: no token lost between consecutive rows.
    flat = torch.cat([b.tokens.flatten() for b in batches])
    assert len(set(flat.tolist())) == len(flat)


def test_determinism_and_seed(source):
    a = take(PackedLoader(source, seq_len=SEQ, batch_size=2, seed=3, min_units=8), 8)
    b = take(PackedLoader(source, seq_len=SEQ, batch_size=2, seed=3, min_units=8), 8)
    c = take(PackedLoader(source, seq_len=SEQ, batch_size=2, seed=4, min_units=8), 8)
    assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x.tokens, y.tokens) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact(source, workers):
    kwargs = dict(seq_len=SEQ, batch_size=3, num_workers=workers, seed=1, min_units=8)
    straight = take(PackedLoader(source, **kwargs), 13)
    first = PackedLoader(source, **kwargs)
    it = iter(first)
    for _ in range(7):
        next(it)
    state = first.state_dict()
    # Workers have prefetched beyond step 7; the state must not count that.
    for _ in range(3):
        next(it)
    it.close()
    assert state["step"] == 7
    resumed = PackedLoader(source, **kwargs)
    resumed.load_state_dict(state)
    after = take(resumed, 6)
    for expected, got in zip(straight[7:], after, strict=True):
        assert got.step == expected.step
        assert torch.equal(got.tokens, expected.tokens)
        assert torch.equal(got.document_ids, expected.document_ids)


def test_epochs_roll_over_and_resume_across_epochs(tmp_path):
    small = make_source(tmp_path / "small", docs=20, shard_tokens=500)
    total = sum(_doc_lengths(small))
    kwargs = dict(seq_len=SEQ, batch_size=2, min_units=4)
    steps = 3 * total // (2 * (SEQ + 1)) + 2  # about three epochs
    straight = take(PackedLoader(small, **kwargs), steps)
    loader = PackedLoader(small, **kwargs)
    take(loader, steps // 2)
    assert loader.stats()["epoch"]["small"] >= 1
    resumed = PackedLoader(small, **kwargs)
    resumed.load_state_dict(loader.state_dict())
    rest = take(resumed, steps - steps // 2)
    assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(straight[steps // 2 :], rest, strict=True))
    counts = Counter(torch.cat([b.tokens.flatten() for b in straight]).tolist())
    assert min(counts.values()) >= 2  # every token seen in several epochs


def test_ranks_and_workers_read_disjoint_parts(source):
    seen: Counter = Counter()
    for rank in range(2):
        loader = PackedLoader(source, seq_len=SEQ, batch_size=2, rank=rank, world_size=2, num_workers=2, min_units=8)
        for batch in take(loader, 12):
            seen.update(batch.tokens.flatten().tolist())
    assert max(seen.values()) == 1
    assert len({t // 1000 for t in seen}) > 8  # many documents, from several units


def test_restore_onto_another_world_size_repeats_and_skips_nothing(source):
    kwargs = dict(seq_len=SEQ, batch_size=2, min_units=12, seed=5)
    emitted: Counter = Counter()
    loaders = [PackedLoader(source, rank=r, world_size=2, **kwargs) for r in range(2)]
    for loader in loaders:
        for batch in take(loader, 9):
            emitted.update(batch.tokens.flatten().tolist())
    state = merge_states([loader.state_dict() for loader in loaders])
    with pytest.raises(ValueError, match="merge_states"):
        PackedLoader(source, rank=0, world_size=3, **kwargs).load_state_dict(loaders[1].state_dict())
    # Three ranks: the units are redistributed, their positions kept.
    loaders = [PackedLoader(source, rank=r, world_size=3, **kwargs) for r in range(3)]
    for loader in loaders:
        loader.load_state_dict(state)
        assert loader.state_dict()["step"] == 9
        for batch in take(loader, 7):
            assert batch.step >= 9
            emitted.update(batch.tokens.flatten().tolist())
    state = merge_states([loader.state_dict() for loader in loaders])
    # Then one rank with two workers.
    single = PackedLoader(source, num_workers=2, **kwargs)
    single.load_state_dict(state)
    for batch in take(single, 6):
        emitted.update(batch.tokens.flatten().tolist())
    final = single.state_dict()
    assert max(emitted.values()) == 1, "a token was emitted twice"
    # Exactly the tokens the final per-unit positions call consumed: nothing skipped, nothing extra.
    assert emitted == consumed_by_state(single, final, source)
    assert final["step"] == 22 and final["rows"] == 9 * 4 + 7 * 6 + 6 * 2


def test_small_source_with_more_readers_than_shards(tmp_path):
    tiny = make_source(tmp_path / "tiny", docs=40, shard_tokens=10**6)
    seen: Counter = Counter()
    for rank in range(4):
        loader = PackedLoader(tiny, seq_len=8, batch_size=1, rank=rank, world_size=4, num_workers=2, min_units=16)
        for batch in take(loader, 4):
            seen.update(batch.tokens.flatten().tolist())
    assert max(seen.values()) == 1
    with pytest.raises(DataError, match="fewer than ranks x workers"):
        PackedLoader(tiny, seq_len=8, batch_size=1, world_size=64, min_units=16)


def test_tokenizer_mismatch_names_the_manifest(source):
    with pytest.raises(DataError, match=r"general/manifest\.json.*tokenizer"):
        PackedLoader(source, seq_len=SEQ, batch_size=1, tokenizer_sha256="f" * 64)
    PackedLoader(source, seq_len=SEQ, batch_size=1, tokenizer_sha256="test")


def test_missing_manifest_names_the_directory(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nothing")):
        PackedLoader(tmp_path / "nothing", seq_len=SEQ, batch_size=1)


def corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        data[700] ^= 0xFF  # inside the first document's tokens
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_corrupt_shard_fails_naming_it(tmp_path, how):
    src = make_source(tmp_path / "bad", docs=60, shard_tokens=1500)
    shard = sorted(src.glob("*.tar"))[1]
    corrupt(shard, how)
    with pytest.raises(DataError, match=shard.name):
        take(PackedLoader(src, seq_len=SEQ, batch_size=4, min_units=4), 40)
    # In a worker process the error surfaces the same way, with the shard's name.
    with pytest.raises(DataError, match=shard.name):
        take(PackedLoader(src, seq_len=SEQ, batch_size=4, min_units=4, num_workers=2), 40)


def test_corrupt_shard_skip_policy_counts(tmp_path):
    src = make_source(tmp_path / "bad", docs=60, shard_tokens=1500)
    shard = sorted(src.glob("*.tar"))[1]
    corrupt(shard, "truncate")
    loader = PackedLoader(src, seq_len=SEQ, batch_size=4, min_units=4, on_corrupt="skip", num_workers=2)
    batches = take(loader, 40)  # the warnings are printed by the worker processes
    assert loader.stats()["corrupt_skipped"] >= 1
    docs = {t // 1000 for b in batches for t in b.tokens.flatten().tolist()}
    bad_docs = set(range(60)) - docs
    assert bad_docs  # the skipped shard's documents never appear
    # Everything corrupt: an error, not a loop that never yields.
    for path in src.glob("*.tar"):
        corrupt(path, "truncate")
    with pytest.warns(UserWarning, match="corrupt"), pytest.raises(DataError, match="no readable tokens"):
        take(PackedLoader(src, seq_len=SEQ, batch_size=4, min_units=4, on_corrupt="skip"), 5)


def test_skip_policy_warns_in_process(tmp_path):
    src = make_source(tmp_path / "bad", docs=60, shard_tokens=1500)
    shard = sorted(src.glob("*.tar"))[0]
    corrupt(shard, "flip")
    loader = PackedLoader(src, seq_len=SEQ, batch_size=4, min_units=4, on_corrupt="skip")
    with pytest.warns(UserWarning, match=shard.name):
        take(loader, 30)
    assert loader.stats()["corrupt_skipped"] >= 1


def test_dead_worker_raises_instead_of_hanging(source):
    loader = PackedLoader(source, seq_len=SEQ, batch_size=2, num_workers=2, min_units=8)
    it = iter(loader)
    next(it)
    for worker in loader._iterator._workers:
        os.kill(worker.pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="exited unexpectedly|worker"):
        for _ in range(100):
            next(it)
    assert time.monotonic() - started < 60


def test_mixture_proportions_within_one_percent(tmp_path):
    weights = parse_weights("general:0.5,math:0.25,code:0.17,multilingual:0.08")
    mixture = Mixture({name: tmp_path / name for name in weights}, weights)
    for seed in (0, 1):
        rows = mixture.sample(np.arange(10_000), seed=seed)
        counts = np.bincount(rows, minlength=4) / 10_000
        assert np.abs(counts - np.array(list(weights.values()))).max() < 0.01
        # Any window, not only from row 0: the schedule resumes from any global row.
        rows = mixture.sample(np.arange(123_457, 133_457), seed=seed)
        assert np.abs(np.bincount(rows, minlength=4) / 10_000 - np.array(list(weights.values()))).max() < 0.01
    with pytest.raises(ValueError, match="bad mixture entry"):
        parse_weights("general:0.5,math")


def test_loader_mixture_realised_proportions_and_anneal_switch(tmp_path):
    sources = {name: make_source(tmp_path / name, docs=80, base=1000 * i) for i, name in enumerate("abc")}
    mixture = Mixture(sources, {"a": 0.6, "b": 0.3, "c": 0.1}, {"a": 0.0, "b": 0.0, "c": 1.0}, anneal_fraction=0.25)
    loader = PackedLoader(mixture, seq_len=8, batch_size=25, total_steps=400, min_units=8)
    assert mixture.anneal_start(400) == 300
    batches = take(loader, 400)
    for batch in batches:
        # Each row comes from the source it is labelled with (document ids are offset by 1000 per source).
        assert [str("abc"[int(t) // 1_000_000]) for t in batch.tokens[:, 0]] == batch.sources
    base = Counter(s for b in batches[:300] for s in b.sources)
    assert {k: v / 7500 for k, v in base.items()} == pytest.approx({"a": 0.6, "b": 0.3, "c": 0.1}, abs=0.01)
    assert batches[299].sources.count("c") < 25 and all(s == "c" for b in batches[300:] for s in b.sources)
    stats = loader.stats()
    assert stats["phase"] == "anneal" and stats["source_rows"]["c"] == base["c"] + 2500
    # The schedule resumes with the step: a loader restored at step 290 anneals from step 300 on.
    again = PackedLoader(mixture, seq_len=8, batch_size=25, total_steps=400, min_units=8)
    state = dict(loader.state_dict(), step=290, rows=290 * 25)
    again.load_state_dict(state)
    resumed = take(again, 12)
    assert [b.step for b in resumed][:2] == [290, 291]
    assert resumed[9].sources == batches[299].sources and all(s == "c" for s in resumed[10].sources)


def test_packed_rows_give_the_lm_what_separate_documents_give(source):
    model = tiny_model()
    batch = take(PackedLoader(source, seq_len=SEQ, batch_size=2, min_units=8), 3)[-1]
    tokens = batch.tokens[:, :-1] % 512  # the tiny vocabulary
    ids = batch.document_ids[:, :-1]
    with torch.no_grad():
        packed = model(tokens, document_ids=ids)
        for row in range(tokens.shape[0]):
            for doc in ids[row].unique():
                span = (ids[row] == doc).nonzero().flatten()
                alone = model(tokens[row : row + 1, span])
                torch.testing.assert_close(packed[row, span], alone[0], atol=1e-4, rtol=1e-4)
