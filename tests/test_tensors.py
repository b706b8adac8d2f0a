"""on_device / host_to_device: host values or tensors on the asked device, same values."""

import torch

from vllm_adakv.tensors import host_to_device, on_device


def test_values_and_dtype_on_cpu():
    t = on_device([[1, 2], [3, 4]], torch.int32, "cpu")
    assert t.dtype == torch.int32 and t.device.type == "cpu"
    assert t.tolist() == [[1, 2], [3, 4]]
    assert on_device([True, False], torch.bool, None).tolist() == [True, False]


def test_host_tensor_to_cpu_keeps_values():
    host = torch.randn(3, 5)
    moved = host_to_device(host, "cpu")
    assert moved.device.type == "cpu" and torch.equal(moved, host)
