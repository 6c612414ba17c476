"""Name rules and name identity."""

import pytest

from chatd.names import name_key, name_problem


def test_case_and_width_fold_to_one_name():
    assert name_key("Alice") == name_key("alice") == name_key("Ａｌｉｃｅ")
    assert name_key("alice") != name_key("alicia")


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "empty"),
        ("a" * 33, "longer than 32 characters"),
        ("al ice", "contains whitespace"),
        ("al\tice", "contains whitespace"),
        ("al\x1bice", "contains control characters"),
        ("al\u200bice", "contains control characters"),
    ],
)
def test_bad_names(name, problem):
    assert name_problem(name, 32) == problem


@pytest.mark.parametrize("name", ["alice", "a" * 32, "管理员2", "bob_the-builder", "Ωmega"])
def test_good_names(name):
    assert name_problem(name, 32) is None
