"""Split a model (a GGUF file, or a prepared model folder) into parts of <= 56 MiB.

The GPU machines have no network and take at most 64 MiB of ignored files per call, so a
model travels as parts over consecutive calls and is rebuilt there by
``benchmarks/quality/gpu_prepare.sh``. Preferred: the 491 MB Qwen GGUF (9 parts) plus the
``gguf`` wheel, converted on the GPU host; a converted folder (1.26 GB in bf16) also works.

    python -m benchmarks.quality.split_model                 # the Qwen GGUF -> .gpu/qwen/
    python -m benchmarks.quality.split_model --src DIR_OR_FILE --out .gpu/NAME

Writes ``<out>/<name>.partNNN`` (a GGUF: the file's bytes; a folder: an uncompressed tar
stream), ``<out>/MANIFEST`` (kind, name, sha256 of the whole and of every part) and, in
``<out>/wheels/``, the wheels the conversion needs beyond a vLLM install (``gguf``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .engine import REPO

PART_BYTES = 56 * 1024 * 1024
# Pure-Python wheels the GGUF conversion needs on the GPU host (transformers is there).
CONVERT_WHEELS = ("gguf==0.19.0",)


def _chunks(stream: io.BufferedIOBase, size: int) -> Iterator[bytes]:
    while True:
        data = stream.read(size)
        if not data:
            return
        yield data


def _tar_stream(folder: Path) -> io.BufferedIOBase:
    """An uncompressed tar of ``folder`` (top-level files), in an anonymous temp file."""
    tmp = tempfile.TemporaryFile()  # noqa: SIM115
    with tarfile.open(fileobj=tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for f in sorted(folder.iterdir()):
            if f.is_file():
                tar.add(f, arcname=f"{folder.name}/{f.name}")
    tmp.seek(0)
    return tmp


def split(src: Path, out: Path, part_bytes: int = PART_BYTES) -> list[Path]:
    """Write the parts and the MANIFEST; return the part paths."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.part[0-9][0-9][0-9]"):
        old.unlink()
    kind = "dir" if src.is_dir() else "file"
    stream = _tar_stream(src) if kind == "dir" else open(src, "rb")  # noqa: SIM115
    whole = hashlib.sha256()
    lines, parts = [], []
    with stream:
        for i, data in enumerate(_chunks(stream, part_bytes)):
            part = out / f"{src.name}.part{i:03d}"
            part.write_bytes(data)
            whole.update(data)
            lines.append(f"part {hashlib.sha256(data).hexdigest()} {part.name}")
            parts.append(part)
    header = [f"kind {kind}", f"name {src.name}", f"sha256 {whole.hexdigest()}"]
    (out / "MANIFEST").write_text("\n".join(header + lines) + "\n")
    return parts


def fetch_wheels(out: Path) -> None:
    (out / "wheels").mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--disable-pip-version-check", "-q", "-d", str(out / "wheels"),
                    *CONVERT_WHEELS], check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality.split_model",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=None,
                    help="GGUF file or model folder (default: the Qwen2.5-Coder-0.5B GGUF, "
                    "assembled by prepare_model)")
    ap.add_argument("--out", default=str(REPO / ".gpu" / "qwen"))
    ap.add_argument("--part-mib", type=int, default=56)
    ap.add_argument("--no-wheels", action="store_true")
    args = ap.parse_args(argv)
    if args.part_mib > 56:
        ap.error("parts must stay <= 56 MiB (a device call carries 64 MiB, the working "
                 "tree included: ~6 MiB)")
    if args.src:
        src = Path(args.src).expanduser().resolve()
    else:
        from adakv_devtools.prepare_model import MODELS, find_gguf

        src = find_gguf(MODELS["qwen2.5-coder-0.5b"])
    out = Path(args.out)
    parts = split(src, out, args.part_mib * 1024 * 1024)
    if not args.no_wheels:
        fetch_wheels(out)
    print(f"{len(parts)} parts of {src.name} in {out} (MANIFEST + wheels/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
