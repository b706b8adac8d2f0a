"""on_device: host values as a tensor of the asked dtype, on the asked device."""

import torch

from vllm_adakv.tensors import on_device


def test_values_and_dtype_on_cpu():
    t = on_device([[1, 2], [3, 4]], torch.int32, "cpu")
    assert t.dtype == torch.int32 and t.device.type == "cpu"
    assert t.tolist() == [[1, 2], [3, 4]]
    assert on_device([True, False], torch.bool, None).tolist() == [True, False]
