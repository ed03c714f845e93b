"""Issue 19 rows 6 and 7: export_peft is all-or-nothing and does not silently overwrite another adapter.

Row 6: a failure half-way (config not serialisable / not writable, the final rename failing) used to leave new
weights beside the old lora_alpha, which both the runtime and PEFT load without error. Now the files go to a
temporary directory beside the target and are renamed into place: a failure leaves the old folder byte for byte.
Row 7: exporting into a folder holding another adapter overwrote it silently and left a stale adapter_model.bin
and README.md beside the new files. Now that needs overwrite=True, which leaves exactly the new adapter's files.
"""
from __future__ import annotations

import inspect
import json
import os

import pytest
import torch

from hyperlora.adapters import peft_io
from hyperlora.adapters.peft_io import export_peft, read_peft

NAMES = {"model.layers.0.self_attn.q_proj": (16, 16), "model.layers.0.self_attn.v_proj": (16, 8)}


def _adapters(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(4, i, generator=g), torch.randn(o, 4, generator=g)) for n, (i, o) in NAMES.items()}


def _snapshot(d) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _leftovers(d) -> list:
    return sorted(p.name for p in d.parent.iterdir() if p.name.startswith(f".{d.name}."))


def _overwrite_kw() -> dict:
    """overwrite=True where export_peft has it (the old one wrote over anything without being asked)."""
    return {"overwrite": True} if "overwrite" in inspect.signature(export_peft).parameters else {}


@pytest.fixture
def old(tmp_path):
    """A folder holding adapter 1 (alpha 8) plus a README, as PEFT's save_pretrained leaves it."""
    d = tmp_path / "adapter"
    export_peft(_adapters(1), d, rank=8, alpha=8)
    (d / "README.md").write_text("adapter one\n")
    return d


def test_unserialisable_config_fails_before_anything_is_written(old):
    before = _snapshot(old)
    with pytest.raises(TypeError):
        export_peft(_adapters(2), old, rank=8, alpha=32, base_model_name_or_path=object())
    assert _snapshot(old) == before and _leftovers(old) == []


def test_config_write_failure_leaves_the_old_folder_exactly_as_it_was(old, monkeypatch):
    before = _snapshot(old)
    real = getattr(peft_io, "_write_file", None)

    def failing(path, data):
        if path.name == "adapter_config.json":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, data)

    monkeypatch.setattr(peft_io, "_write_file", failing, raising=False)
    with pytest.raises(PermissionError):
        export_peft(_adapters(2), old, rank=8, alpha=32, **_overwrite_kw())
    assert _snapshot(old) == before, "the old folder changed: new weights beside the old config"
    assert _leftovers(old) == []
    assert read_peft(old).config["lora_alpha"] == 8


def test_failed_rename_restores_the_old_folder(old, monkeypatch):
    before = _snapshot(old)
    real = os.replace

    def failing(src, dst):
        if os.fspath(dst) == os.fspath(old) and os.path.basename(os.fspath(src)).startswith(".adapter."):
            if not os.path.exists(os.path.join(os.fspath(src), "README.md")):  # the new folder, not the old one
                raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="No space left"):
        export_peft(_adapters(2), old, rank=8, alpha=32, **_overwrite_kw())
    assert _snapshot(old) == before and _leftovers(old) == []


def test_exporting_over_another_adapter_needs_overwrite_and_leaves_no_stale_files(old):
    (old / "adapter_model.bin").write_bytes(b"stale pickle")
    before = _snapshot(old)
    with pytest.raises(FileExistsError, match=r"already holds \['README\.md', 'adapter_config\.json', "
                                              r"'adapter_model\.bin', 'adapter_model\.safetensors'\].*overwrite=True"):
        export_peft(_adapters(2), old, rank=8, alpha=32)
    assert _snapshot(old) == before
    export_peft(_adapters(2), old, rank=8, alpha=32, overwrite=True)
    assert sorted(p.name for p in old.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    ad = read_peft(old)
    assert ad.config["lora_alpha"] == 32
    for n, (a, b) in _adapters(2).items():
        assert torch.equal(ad.raw[n][0][:4], a) and torch.equal(ad.raw[n][1][:, :4], b)
    assert _leftovers(old) == []


def test_re_exporting_the_same_adapter_is_a_no_op(tmp_path):
    d = tmp_path / "same"
    export_peft(_adapters(3), d, rank=8, alpha=8)
    before = {p.name: (p.read_bytes(), p.stat().st_ino) for p in d.iterdir()}
    export_peft(_adapters(3), d, rank=8, alpha=8)  # same content: no overwrite needed, nothing rewritten
    assert {p.name: (p.read_bytes(), p.stat().st_ino) for p in d.iterdir()} == before


def test_overwrite_does_not_replace_a_folder_that_is_not_an_adapter(tmp_path):
    d = tmp_path / "project"
    (d / "src").mkdir(parents=True)
    (d / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an adapter directory"):
        export_peft(_adapters(1), d, rank=8, alpha=8, overwrite=True)
    assert (d / "notes.txt").read_text() == "keep me" and (d / "src").is_dir()
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(FileExistsError, match="is not a directory"):
        export_peft(_adapters(1), f, rank=8, alpha=8, overwrite=True)


def test_new_and_empty_directories_are_written(tmp_path):
    export_peft(_adapters(1), tmp_path / "deep" / "new", rank=8, alpha=8)
    (tmp_path / "empty").mkdir()
    export_peft(_adapters(1), tmp_path / "empty", rank=8, alpha=8)
    assert _snapshot(tmp_path / "deep" / "new") == _snapshot(tmp_path / "empty")


def test_written_bytes_are_what_save_file_and_json_dumps_write(tmp_path):
    """The files are byte-identical to the old writer's (safetensors.torch.save_file, json.dumps(indent=2))."""
    from safetensors.torch import load_file, save_file

    d = export_peft(_adapters(4), tmp_path / "a", rank=5, alpha=10)
    tensors = load_file(str(d / "adapter_model.safetensors"))
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    assert (d / "adapter_model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert (d / "adapter_config.json").read_text() == json.dumps(cfg, indent=2) + "\n"
