"""The linear layer with a Triton bias-gradient sum against ``nn.Linear``, and the column sum alone.

The kernels run under Triton's interpreter in a child process (:mod:`kernel_programs.linear`); it
saves both implementations' outputs and gradients, and the comparisons live here.
"""

from __future__ import annotations

import json

import pytest
import torch
from kernel_checks import run_program

# (name, dtype, g shape, knobs: ColumnSumLaunch fields): the small knobs give several row chunks and column slabs with
# ragged last ones; 2560 columns is the student's widest bias (GEGLU's projection at 320 channels).
SMALL = {"block_c": 16, "block_rows": 4, "min_chunk_rows": 8, "min_programs": 64}
SUMS = [
    ("fp32_small_tiles", "float32", [203, 37], SMALL),
    ("bf16_small_tiles", "bfloat16", [203, 40], SMALL),
    ("bf16_2560", "bfloat16", [300, 2560], {}),
    ("fp16_one_row", "float16", [1, 24], {}),
]

@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_program("linear", json.dumps(SUMS), folder=tmp_path_factory.mktemp("linear"))


@pytest.mark.parametrize("case", SUMS, ids=[c[0] for c in SUMS])
def test_column_sum_is_an_fp32_sum_rounded_once(results: dict, case: tuple) -> None:
    res = results[case[0]]
    dtype = getattr(torch, case[1])
    truth = res["truth"]
    assert res["kernel"].dtype == dtype and res["kernel_fp32"].dtype == torch.float32
    # fp32 accumulation: within fp32 rounding of the float64 sum, whatever the order.
    torch.testing.assert_close(res["kernel_fp32"].double(), truth, rtol=1e-5, atol=1e-5 * float(truth.abs().max()))
    # The low-precision result is that sum rounded once: within half an ulp of the exact sum, up to
    # the fp32 error above; torch's own reduction lands in the same place.
    rounded_truth = truth.to(dtype)
    assert torch.equal(res["kernel"], res["kernel_fp32"].to(dtype))
    assert float((res["kernel"].double() - rounded_truth.double()).abs().max()) <= float(
        (rounded_truth.double() - truth).abs().max() * 2 + 1e-5 * truth.abs().max()
    )
    torch.testing.assert_close(res["kernel"].float(), res["reference"].float(), rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-3)


@pytest.mark.parametrize("autocast", [False, True])
def test_linear_matches_nn_linear_forward_and_backward(results: dict, autocast: bool) -> None:
    grads = results[f"module_autocast_{autocast}"]
    for key in ("out", "x", "weight", "bias"):
        k, r = grads["k"][key], grads["r"][key]
        assert k.dtype == r.dtype and k.shape == r.shape, key
        if autocast:
            # The same bf16 products; the bias sum alone may round differently (one bf16 ulp).
            torch.testing.assert_close(k.float(), r.float(), rtol=1e-2, atol=1e-2 * float(r.float().abs().max()))
        else:
            torch.testing.assert_close(k, r, rtol=1e-5, atol=1e-5)
    assert grads["k"]["weight"].dtype == torch.float32  # the cast back to the fp32 parameter, as autocast's


def test_linear_sums_the_bias_gradient_with_the_kernel(results: dict) -> None:
    # one call of the kernel per forward pass, whose backward is the kernel's (its column sum)
    assert results["kernel_calls"] == 2
    assert results["backward_functions"] == ["_LinearBackward", "_LinearBackward"]
    assert not results["no_bias_available"]
