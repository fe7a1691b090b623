"""The package's number checks (alast_kernels/_validate.py): what they accept, what they return, and that a
refusal names the argument and what was expected."""
import math

import numpy as np
import pytest

from alast_kernels._validate import check_distinct_ints, check_fraction, check_int, check_real, check_reals


@pytest.mark.parametrize("call, message", [
    (lambda: check_int("n", 0, 1), "n: expected a positive int, got 0"),
    (lambda: check_int("n", True, 0), "n: expected an int >= 0, got True"),
    (lambda: check_int("n", 2.0), "n: expected an int, got 2.0"),
    (lambda: check_int("n", 9, 1, 8, note=" (8 blocks)"), "n: expected an int in [1, 8] (8 blocks), got 9"),
    (lambda: check_int("n", "x", 1, optional=True), "n: expected a positive int or None, got 'x'"),
    (lambda: check_fraction("r", 0), r"r: expected a number in (0, 1], got 0"),
    (lambda: check_fraction("r", math.nan), r"r: expected a number in (0, 1], got nan"),
    (lambda: check_real("s", -1.0, 0, low_open=True, optional=True), "s: expected a finite number > 0 or None"),
    (lambda: check_real("a", math.inf), "a: expected a finite number, got inf"),
    (lambda: check_real("p", 1, 0, 1, high_open=True), r"p: expected a number in [0, 1), got 1"),
    (lambda: check_real("p", "0.5", 0, 1), r"p: expected a number in [0, 1], got '0.5'"),
    (lambda: check_reals("b", [1.0], 2, 0.0), r"b: expected a list of 2 finite numbers in [0.0, inf], got [1.0]"),
    (lambda: check_distinct_ints("l", (1, 1), 1, what="offsets"), r"l: expected distinct positive offsets"),
    (lambda: check_distinct_ints("l", (4,), 0, 4, what="indices", optional=True),
     r"l: expected distinct indices in [0, 4) or None, got (4,)"),
    (lambda: check_distinct_ints("l", 3, 0), r"l: expected distinct ints >= 0, got 3"),
])
def test_a_refusal_names_the_argument_and_what_was_expected(call, message):
    with pytest.raises(ValueError) as caught:
        call()
    assert str(caught.value).startswith(message)


def test_numpy_numbers_pass_and_come_back_as_python_numbers():
    assert type(check_int("n", np.int64(3), 1)) is int and check_int("n", None, optional=True) is None
    assert type(check_fraction("r", np.float32(0.5))) is float
    assert check_reals("b", (np.float64(1), 2), 2) == [1.0, 2.0]
    assert check_distinct_ints("l", [np.int32(3), 1], 1) == (1, 3)
