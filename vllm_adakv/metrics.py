"""Prometheus metrics of KV compression, recorded where the work happens.

Compression runs in the engine-core process (scheduler: blocks released,
requests skipped) and in the workers (compression time, kept tokens), while
``/metrics`` is served by the API-server process. vLLM 0.32 ships its own
metrics to the frontend inside ``SchedulerStats``, a fixed dataclass with no
field for a plugin, so these metrics go through prometheus_client's multiprocess
files instead, with no set-up:

- the process that starts the engine (API server, ``LLM``) calls
  :func:`collect_engine_metrics` once its config says compression is on: it makes
  a private directory, names it to the processes it starts (``ENV``), and adds a
  collector of this package's metrics from those files to prometheus_client's
  default registry, the one vLLM's ``/metrics`` serves. vLLM's own metrics are
  untouched: that process stays out of multiprocess mode (exporting
  ``PROMETHEUS_MULTIPROC_DIR`` there would hide them: prometheus_client picks its
  in-memory or file-backed values when first imported, long before any plugin
  runs, while vLLM's ``/metrics`` would then read the files alone);
- an engine process (not the one that made the directory) switches
  prometheus_client to multiprocess mode in that directory before it records
  its first sample (``patches.record_metrics_to_files``), as if
  ``PROMETHEUS_MULTIPROC_DIR`` had been exported before it started; nothing of
  vLLM's is served from these processes.

A user's own ``PROMETHEUS_MULTIPROC_DIR`` (exported, empty, before the server
starts) is kept: every process writes there and vLLM's ``/metrics`` aggregates it.
Nothing here imports vLLM.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

RATIO_BUCKETS = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0, 128.0)
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# name -> (kind, help); names follow vLLM's "vllm:" prefix with our own namespace.
METRICS: dict[str, tuple[str, str]] = {
    "vllm_adakv:compression_ratio": (
        "histogram", "Prompt tokens / mean tokens kept per KV head and layer, per request."),
    "vllm_adakv:compression_seconds": (
        "histogram", "Scoring, selection and compaction time of one request, all layers."),
    "vllm_adakv:blocks_released": (
        "counter", "KV blocks handed back to vLLM's block pool after compression."),
    "vllm_adakv:decode_blocks_released": (
        "counter", "Of those, the blocks freed behind the window by decode-time compression."),
    "vllm_adakv:requests_compressed": (
        "counter", "Requests compressed, by method (a preempted request counts again)."),
    "vllm_adakv:requests_skipped": (
        "counter", "Requests left uncompressed (short prompt, nothing to free, or opted out)."),
}

# Label names of the labelled metrics.
LABELS: dict[str, tuple[str, ...]] = {"vllm_adakv:requests_compressed": ("method",)}

PREFIX = "vllm_adakv:"
# The private directory of collect_engine_metrics, for the processes the frontend starts.
ENV = "VLLM_ADAKV_METRICS_DIR"

_made: dict[str, Any] = {}
_collecting_pid: int | None = None  # the process that made ENV's directory


class _EngineMetrics:
    """This package's metrics from the multiprocess files of the engine processes."""

    def __init__(self, path: str) -> None:
        from prometheus_client.multiprocess import MultiProcessCollector

        self._files = MultiProcessCollector(None, path=path)

    def describe(self) -> list:
        return []  # nothing to check for name clashes (and no collect() on register)

    def collect(self):
        return (m for m in self._files.collect() if m.name.startswith(PREFIX))


def collect_engine_metrics() -> None:
    """Show the metrics that the engine processes started from here will record on this
    process's default registry (vLLM's ``/metrics``); idempotent.

    Call it before the engine processes start. Nothing to do when the user runs
    multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``): vLLM's /metrics reads it.
    """
    global _collecting_pid
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") or _collecting_pid == os.getpid():
        return
    import prometheus_client

    path = tempfile.mkdtemp(prefix="vllm-adakv-metrics-")
    prometheus_client.REGISTRY.register(_EngineMetrics(path))
    os.environ[ENV] = path
    _collecting_pid = os.getpid()
    atexit.register(_remove, path, _collecting_pid)


def _remove(path: str, pid: int) -> None:
    if os.getpid() == pid:  # not in a forked engine process that inherited the hook
        shutil.rmtree(path, ignore_errors=True)


# Called with the collecting process's pid before this process records its first sample
# (patches.patch_metrics installs the switch to file-backed values there).
BEFORE_FIRST_RECORD: list[Callable[[int | None], None]] = []


def _metric(name: str) -> Any:
    """The metric; all of them are created on the first record, so only the processes
    that compress hold them (an API server without multiprocess mode would otherwise
    show them stuck at zero)."""
    if not _made:
        import prometheus_client

        for hook in BEFORE_FIRST_RECORD:  # patches.patch_metrics
            hook(_collecting_pid)

        for key, (kind, doc) in METRICS.items():
            if key in LABELS:
                _made[key] = prometheus_client.Counter(key, doc, LABELS[key])
            elif kind == "counter":
                _made[key] = prometheus_client.Counter(key, doc)
            else:
                buckets = RATIO_BUCKETS if key.endswith("ratio") else SECONDS_BUCKETS
                _made[key] = prometheus_client.Histogram(key, doc, buckets=buckets)
    return _made[name]


def record_compression(method: str, prompt_len: int, mean_kept_tokens: float,
                       seconds: float) -> None:
    """One request compressed on a worker, with the request's effective method."""
    _metric("vllm_adakv:requests_compressed").labels(method=method).inc()
    _metric("vllm_adakv:compression_seconds").observe(seconds)
    if mean_kept_tokens > 0:
        _metric("vllm_adakv:compression_ratio").observe(prompt_len / mean_kept_tokens)


def record_released_blocks(num_blocks: int, decoding: bool = False) -> None:
    """Blocks handed back to the pool; ``decoding``: by decode-time compression."""
    if num_blocks > 0:
        _metric("vllm_adakv:blocks_released").inc(num_blocks)
        if decoding:
            _metric("vllm_adakv:decode_blocks_released").inc(num_blocks)


def record_skipped() -> None:
    _metric("vllm_adakv:requests_skipped").inc()
