"""patches: steps with prompt tokens never replay a full CUDA graph when compressing."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import numpy as np

from vllm_adakv.patches import _keep_prompt_steps_out_of_full_graphs
from vllm_adakv.worker import context


class _Runner:
    """Stands in for GPUModelRunner: its dispatch method only reports what it got."""

    def __init__(self, computed: list[int], prompt: list[int]) -> None:
        self.input_batch = SimpleNamespace(num_computed_tokens_cpu=np.array(computed),
                                           num_prompt_tokens=np.array(prompt))
        # A compressing CUDA group's builder sets this flag on the runner's context.
        self.__dict__[context._ATTR] = SimpleNamespace(prompt_free_decode_graphs=True)

    def _determine_batch_execution_and_padding(self, num_tokens, num_reqs, *args, **kwargs):
        return kwargs.get("force_uniform_decode")


_keep_prompt_steps_out_of_full_graphs(_Runner)


def _dispatch(runner, num_reqs, **kw):
    return runner._determine_batch_execution_and_padding(num_tokens=num_reqs, num_reqs=num_reqs,
                                                         **kw)


def test_prompt_token_forces_a_mixed_batch():
    # row 1 computes the last token of its 700-token prompt: one token, like a decode
    runner = _Runner(computed=[120, 699], prompt=[100, 700])
    assert _dispatch(runner, 2) is False
    # positional num_reqs too
    assert runner._determine_batch_execution_and_padding(2, 2) is False


def test_decode_only_batch_is_left_to_vllm():
    runner = _Runner(computed=[120, 700, 5], prompt=[100, 700, 999])
    assert _dispatch(runner, 2) is None  # only the first two rows are in the batch


def test_capture_and_uncompressed_engines_untouched():
    runner = _Runner(computed=[0], prompt=[100])
    assert _dispatch(runner, 1, force_uniform_decode=True) is True  # graph capture
    context.context_of(runner).prompt_free_decode_graphs = False
    assert _dispatch(runner, 1) is None
    del runner.__dict__[context._ATTR]  # a runner without compression context
    assert _dispatch(runner, 1) is None


def test_vllm_runner_has_the_patched_hook():
    """The wrapped method exists in this vLLM with the parameter the patch sets."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    import vllm_adakv.plugin

    vllm_adakv.plugin.register()
    method = GPUModelRunner._determine_batch_execution_and_padding
    assert getattr(method, "_vllm_adakv_patched", False)
    params = inspect.signature(method.__wrapped__).parameters
    assert "force_uniform_decode" in params and "num_reqs" in params
