"""Prometheus metrics of KV compression, recorded where the work happens.

Compression runs in the engine-core process (scheduler: blocks released,
requests skipped) and in the workers (compression time, kept tokens), while
``/metrics`` is served by the API-server process. vLLM 0.32 ships its own
metrics to the frontend inside ``SchedulerStats``, a fixed dataclass with no
field for a plugin, so these metrics use prometheus_client's multiprocess mode
instead: with ``PROMETHEUS_MULTIPROC_DIR`` set (an empty directory, before the
server starts), every process writes its samples there and vLLM's ``/metrics``
(``get_prometheus_registry``) aggregates all of them. Without it, the samples
stay in the process that recorded them.

Nothing here imports vLLM.
"""

from __future__ import annotations

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
    "vllm_adakv:requests_compressed": (
        "counter", "Requests compressed, by method (a preempted request counts again)."),
    "vllm_adakv:requests_skipped": (
        "counter", "Requests left uncompressed (short prompt, nothing to free, or opted out)."),
}

# Label names of the labelled metrics.
LABELS: dict[str, tuple[str, ...]] = {"vllm_adakv:requests_compressed": ("method",)}

_made: dict[str, Any] = {}


def _metric(name: str) -> Any:
    """The metric; all of them are created on the first record, so only the processes
    that compress hold them (an API server without multiprocess mode would otherwise
    show them stuck at zero)."""
    if not _made:
        import prometheus_client

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


def record_released_blocks(num_blocks: int) -> None:
    if num_blocks > 0:
        _metric("vllm_adakv:blocks_released").inc(num_blocks)


def record_skipped() -> None:
    _metric("vllm_adakv:requests_skipped").inc()
