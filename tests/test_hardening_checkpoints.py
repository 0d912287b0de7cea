"""Checkpoint hardening: re-saves leave no stale files, manifests and DCP metadata are trusted no further than
they must be, a damaged newest training checkpoint is skipped on resume."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from conftest import tiny_model

from adapters.vision import VisionAdapter, VisionAdapterConfig
from encoders.vision import VisionEncoder, VisionEncoderConfig
from llama3mm import Llama3MM
from llama3mm.checkpoint import MANIFEST, lm_sha256
from lm.checkpoint import load_pretrained, save_pretrained
from train.checkpoint import Checkpointer, CheckpointError
from train.config import CheckpointConfig
from train.export import export, write_lm_config
from train.parallel.mesh import destroy_distributed, init_distributed


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- 1. a re-save leaves no stale shards or index ----------------------------------------------------------------


def test_hf_resave_in_one_file_removes_the_earlier_shards_and_index(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA3MM_CACHE", str(tmp_path / "cache"))
    first, second = tiny_model(seed=1), tiny_model(seed=2)
    out = tmp_path / "hf"
    save_pretrained(first, out, format="hf", max_shard_bytes=150_000)
    old_shards = sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert len(old_shards) >= 3 and (out / "model.safetensors.index.json").exists()
    (out / "README.md").write_text("kept: not a layout file")

    save_pretrained(second, out, format="hf")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert _same_weights(load_pretrained(out), second)
    # The LM's digest covers exactly what loads: the same as a clean save of the second model.
    save_pretrained(second, tmp_path / "clean", format="hf")
    assert lm_sha256(out) == lm_sha256(tmp_path / "clean")


def test_meta_resave_with_fewer_model_parallel_shards_removes_the_extra_ones(tmp_path):
    first, second = tiny_model(seed=1), tiny_model(seed=2)
    out = tmp_path / "meta"
    save_pretrained(first, out, format="meta", model_parallel=2)
    assert (out / "consolidated.01.pth").exists()
    save_pretrained(second, out, format="meta", model_parallel=1)
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.00.pth", "params.json"]
    assert _same_weights(load_pretrained(out), second)


def test_a_save_in_the_other_layout_replaces_the_earlier_one(tmp_path):
    first, second = tiny_model(seed=1), tiny_model(seed=2)
    out = tmp_path / "lm"
    save_pretrained(first, out, format="meta")
    save_pretrained(second, out, format="hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert _same_weights(load_pretrained(out), second)


# ---- 2. Llama3MM manifests: relative LM paths, lm_path=, parts and classes from an allow-list ------------------


def _tiny_mm(lm_dir: Path) -> Llama3MM:
    torch.manual_seed(0)
    lm = load_pretrained(lm_dir)
    encoder = VisionEncoder(VisionEncoderConfig.from_preset("tiny", image_size=32))
    adapter = VisionAdapter(VisionAdapterConfig.from_lm(lm.config, encoder.cfg.output_dim, num_layers=1))
    mm = Llama3MM(lm, vision_encoder=encoder, vision_adapter=adapter, lm_path=lm_dir)
    with torch.no_grad():
        mm.extra_embeddings.normal_()
    return mm


@pytest.fixture
def saved_mm(tmp_path, monkeypatch) -> tuple[Path, Llama3MM]:
    """runs/lm (a tiny LM) and runs/mm (a Llama3MM on it) under tmp_path."""
    monkeypatch.setenv("LLAMA3MM_CACHE", str(tmp_path / "cache"))
    lm_dir = save_pretrained(tiny_model(seed=3), tmp_path / "runs" / "lm", format="hf")
    mm = _tiny_mm(lm_dir)
    mm.save_pretrained(tmp_path / "runs" / "mm")
    return tmp_path / "runs", mm


def test_llama3mm_moved_with_its_lm_loads_and_moved_alone_loads_with_lm_path(saved_mm, tmp_path):
    runs, mm = saved_mm
    assert json.loads((runs / "mm" / MANIFEST).read_text())["lm"]["path"] == "../lm"
    moved = tmp_path / "elsewhere" / "runs"
    moved.parent.mkdir()
    shutil.move(runs, moved)
    loaded = Llama3MM.from_pretrained(moved / "mm", device="cpu")
    assert _same_weights(loaded, mm)
    assert Path(loaded.lm_path) == (moved / "lm").resolve()

    alone = tmp_path / "alone"
    shutil.move(moved / "mm", alone)
    with pytest.raises(FileNotFoundError, match="lm_path="):
        Llama3MM.from_pretrained(alone, device="cpu")
    assert _same_weights(Llama3MM.from_pretrained(alone, lm_path=moved / "lm", device="cpu"), mm)
    other = save_pretrained(tiny_model(seed=4), tmp_path / "other_lm", format="hf")
    with pytest.raises(ValueError, match="refusing"):
        Llama3MM.from_pretrained(alone, lm_path=other, device="cpu")


def _edit_manifest(directory: Path, edit) -> Path:
    path = directory / MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    return path


def test_a_manifest_part_outside_the_known_parts_is_refused(saved_mm):
    runs, _ = saved_mm
    (runs / "evil").mkdir()
    path = _edit_manifest(runs / "mm", lambda m: m["parts"].update({"../evil": m["parts"]["vision_adapter"]}))
    with pytest.raises(ValueError, match=re.escape(f"{path}: key 'parts.../evil' is not a known part")):
        Llama3MM.from_pretrained(runs / "mm", device="cpu")


@pytest.mark.parametrize("cls", ["encoders.vision:os.system", "adapters.speech:SpeechAdapter", "builtins:eval"])
def test_a_manifest_class_outside_the_allow_list_is_refused(saved_mm, cls):
    runs, _ = saved_mm
    path = _edit_manifest(runs / "mm", lambda m: m["parts"]["vision_adapter"].update({"class": cls}))
    with pytest.raises(ValueError, match=re.escape(f"{path}: key 'parts.vision_adapter' names classes ('{cls}'")):
        Llama3MM.from_pretrained(runs / "mm", device="cpu")


def test_demo_passes_lm_to_from_pretrained(saved_mm, monkeypatch):
    import demo.app

    runs, _ = saved_mm
    seen = {}

    def fake_from_pretrained(directory, **kwargs):
        seen.update(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(demo.app.Llama3MM, "from_pretrained", fake_from_pretrained)
    with pytest.raises(SystemExit, match="stop here"):
        demo.app.main(["--checkpoint", str(runs / "mm"), "--lm", str(runs / "lm")])
    assert seen["lm_path"] == str(runs / "lm")


# ---- 3. DCP .metadata through a restricted unpickler; 4. a damaged newest checkpoint is skipped on resume --------


class _RunsCode:
    """Pickles to a call of os.system: what a tampered .metadata could hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def process_group():
    started = not dist.is_initialized()
    init_distributed()
    yield
    if started:
        destroy_distributed()


def _trained_run(run_dir: Path, steps: int) -> list[dict[str, torch.Tensor]]:
    """A tiny model saved after each of `steps` AdamW steps (step-1 ... step-N); returns each step's weights."""
    model = tiny_model(seed=1).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    checkpointer = Checkpointer(CheckpointConfig(keep=0), str(run_dir), model, optimizer)
    weights = []
    for step in range(1, steps + 1):
        model(torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(step))).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        checkpointer.save(step)
        weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    write_lm_config(model.config, run_dir)
    return weights


def _resume(run_dir: Path) -> tuple[int, dict[str, torch.Tensor]]:
    model = tiny_model(seed=9).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step = Checkpointer(CheckpointConfig(), str(run_dir), model, optimizer).maybe_resume()
    return step, model.state_dict()


@pytest.mark.usefixtures("process_group")
def test_a_metadata_pickle_that_would_run_code_is_refused_on_export_and_resume(tmp_path):
    _trained_run(tmp_path / "run", steps=1)
    ckpt = tmp_path / "run" / "checkpoints" / "step-1"
    marker = tmp_path / "ran"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    refused = re.escape(f"{ckpt / '.metadata'}: refusing to load posix.system")

    with pytest.raises(CheckpointError, match=refused):
        export(ckpt, tmp_path / "hf")
    model = tiny_model().train()
    checkpointer = Checkpointer(CheckpointConfig(), str(tmp_path / "run"), model, torch.optim.AdamW(model.parameters()))
    with pytest.raises(CheckpointError, match=refused):
        checkpointer.load(str(ckpt))
    # Auto-resume skips it; with no other checkpoint it refuses to start over beside it (pruning would delete it).
    with pytest.warns(UserWarning, match=f"skipping incomplete checkpoint {ckpt}.*refusing to load posix.system"):
        with pytest.raises(CheckpointError, match=f"no checkpoint in .* verifies \\({ckpt}\\)"):
            checkpointer.maybe_resume()
    assert not marker.exists()


@pytest.mark.usefixtures("process_group")
@pytest.mark.parametrize("damage", ["truncated .distcp", "broken meta.json", "missing .distcp"])
def test_resume_skips_a_damaged_newest_checkpoint_with_a_warning(tmp_path, damage):
    weights = _trained_run(tmp_path / "run", steps=2)
    newest = tmp_path / "run" / "checkpoints" / "step-2"
    shard = next(newest.glob("*.distcp"))
    if damage == "truncated .distcp":
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 2)
    elif damage == "missing .distcp":
        shard.unlink()
    else:
        (newest / "meta.json").write_text('{"step": 2, "data"')

    with pytest.warns(UserWarning, match=f"skipping incomplete checkpoint {newest}"):
        step, state = _resume(tmp_path / "run")
    assert step == 1
    assert all(torch.equal(state[k], weights[0][k]) for k in weights[0])
    with pytest.warns(UserWarning, match=f"skipping incomplete checkpoint {newest}"):  # export takes the same one
        assert export(tmp_path / "run", tmp_path / "hf") == newest.with_name("step-1")


@pytest.mark.usefixtures("process_group")
def test_export_overwrite_leaves_only_the_exported_weights(tmp_path):
    weights = _trained_run(tmp_path / "run", steps=1)
    out = tmp_path / "hf"
    save_pretrained(tiny_model(seed=5), out, format="hf", max_shard_bytes=150_000)  # an earlier export, sharded
    export(tmp_path / "run", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    state = load_pretrained(out).state_dict()
    assert all(torch.equal(state[k], weights[0][k]) for k in weights[0])


def test_llama3mm_resave_replaces_its_embedded_lm(tmp_path, monkeypatch):
    """An LM without a path of its own is written to DIR/lm; a re-save there leaves none of the earlier files."""
    monkeypatch.setenv("LLAMA3MM_CACHE", str(tmp_path / "cache"))
    lm_dir = save_pretrained(tiny_model(seed=3), tmp_path / "lm", format="hf")
    mm = _tiny_mm(lm_dir)
    mm.lm_path = None
    save_pretrained(tiny_model(seed=6), tmp_path / "mm" / "lm", format="hf", max_shard_bytes=150_000)
    mm.save_pretrained(tmp_path / "mm")
    assert sorted(p.name for p in (tmp_path / "mm" / "lm").iterdir()) == ["config.json", "model.safetensors"]
    assert _same_weights(Llama3MM.from_pretrained(tmp_path / "mm", device="cpu"), mm)


@pytest.mark.usefixtures("process_group")
def test_a_non_tensor_value_that_would_run_code_is_refused_on_resume(tmp_path):
    """DCP loads non-tensor values (optimizer hyperparameters) with a full unpickler; ours admits plain data only."""
    _trained_run(tmp_path / "run", steps=1)
    model = tiny_model().train()
    checkpointer = Checkpointer(CheckpointConfig(), str(tmp_path / "run"), model, torch.optim.AdamW(model.parameters()))
    state = checkpointer._state()
    marker = tmp_path / "ran"
    lr_key = next(key for key in state["optim"] if key.endswith(".lr"))
    state["optim"][lr_key] = _RunsCode(marker)
    tampered = tmp_path / "run" / "checkpoints" / "step-2"
    dcp.save(state, checkpoint_id=str(tampered))
    shutil.copy(tampered.with_name("step-1") / "meta.json", tampered / "meta.json")

    with pytest.raises(CheckpointError, match=rf"(?s){tampered} cannot be loaded.*refusing to load optim\.{lr_key}"):
        checkpointer.maybe_resume()
    assert not marker.exists()
