"""The tolerance rule itself (tests/tolerance.py): it accepts what correct float arithmetic in another order
gives and still refuses small planted errors."""
import pytest
import torch

from tolerance import allowed_error, assert_flash_rule


def _case(dtype, scale, n=257, seed=0):
    """float64 ``exact`` with ``max|exact| == scale`` and PyTorch's own ``dtype`` result (its rounding)."""
    g = torch.Generator().manual_seed(seed)
    exact = torch.randn(n, generator=g, dtype=torch.float64)
    exact = exact / exact.abs().max() * scale
    return exact, exact.to(dtype)


@pytest.mark.parametrize("dtype,relative", [(torch.float32, 1e-4), (torch.float16, 1e-2)])
@pytest.mark.parametrize("scale", [1.0, 250.0])
@pytest.mark.parametrize("slack", [0.0, 1e-6])
def test_planted_relative_error_fails(dtype, relative, scale, slack):
    exact, torch_same = _case(dtype, scale)
    ours = (exact * (1 + relative)).to(dtype)  # every element off by `relative`
    with pytest.raises(AssertionError, match="error"):
        assert_flash_rule("planted", ours, torch_same, exact, slack=slack)
    one = torch_same.clone()  # only the largest element off by `relative`
    i = exact.abs().argmax()
    one[i] = (exact[i] * (1 + relative)).to(dtype)
    with pytest.raises(AssertionError, match="error"):
        assert_flash_rule("planted at the largest", one, torch_same, exact, slack=slack)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_result_rounded_to_the_other_neighbour_passes(dtype):
    """PyTorch exact by luck (its error 0), ours one unit in the last place away: a correct kernel."""
    exact = torch.tensor([3.0, -1.5, 200.0], dtype=torch.float64)  # representable in every dtype
    torch_same = exact.to(dtype)
    ours = torch.nextafter(torch_same, torch.full_like(torch_same, float("inf")))
    assert_flash_rule("other neighbour", ours, torch_same, exact, slack=0.0)
    with pytest.raises(AssertionError):  # the rule without its floor, as it was, refuses it
        assert (ours.double() - exact).abs().max() <= 2 * (torch_same.double() - exact).abs().max()


def test_float32_gradient_of_a_long_sum_passes():
    """The case that failed on an AVX-512 CPU: a scalar gradient of about 250 whose float32 error was 2.1e-4
    (8e-7 relative) while PyTorch's happened to be 1.3e-6."""
    exact = torch.tensor([250.0], dtype=torch.float64)
    assert_flash_rule("scalar gradient", (exact + 2.12e-4).float(), (exact + 1.28e-6).float(), exact, slack=1e-6)


def test_more_than_twice_pytorchs_error_fails():
    """Where PyTorch's own error dominates the floor, the flash-attention part of the rule decides."""
    exact = torch.linspace(-1, 1, 101, dtype=torch.float64)
    torch_same = exact + 1e-3  # a low-precision PyTorch result
    assert_flash_rule("1.9x", exact + 1.9e-3, torch_same, exact, slack=0.0)
    with pytest.raises(AssertionError):
        assert_flash_rule("2.1x", (exact + 2.1e-3).float(), torch_same, exact, slack=0.0)
    assert allowed_error(torch_same, exact, torch.float32, 0.0) < 2.1e-3


def test_non_finite_results_fail():
    exact, torch_same = _case(torch.float32, 1.0)
    ours = torch_same.clone()
    ours[3] = float("nan")
    with pytest.raises(AssertionError, match="non-finite"):
        assert_flash_rule("nan", ours, torch_same, exact)


def test_runs_on_the_arithmetic_path_asked_for(request):
    """`make test` reruns the tolerance tests with ATEN_CPU_CAPABILITY and ALAST_TEST_THREADS set: they must
    take effect, or the other-path run would silently repeat the default one."""
    import os
    assert request.node.get_closest_marker("tolerance") is not None  # this module uses the rule: marked
    assert torch.get_num_threads() == int(os.environ.get("ALAST_TEST_THREADS", "1"))
    asked = os.environ.get("ATEN_CPU_CAPABILITY")
    if asked:
        assert torch.backends.cpu.get_cpu_capability() == asked.upper()
