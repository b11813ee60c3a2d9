"""The audit chain's canonical JSON: the fast path must equal RFC 8785 exactly."""

from __future__ import annotations

import rfc8785
from hypothesis import given
from hypothesis import strategies as st

from paymaster.core.audit import canonical

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1)
    | st.text(st.characters(blacklist_categories=("Cs",))),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(st.characters(blacklist_categories=("Cs",)), max_size=8), children, max_size=4
        )
    ),
    max_leaves=20,
)


@given(json_values)
def test_canonical_equals_rfc8785(value: object) -> None:
    assert canonical(value) == rfc8785.dumps(value)


def test_control_characters_and_unicode_match() -> None:
    value = {"b": '\x00\x01\x1f\x7f\u2028"\\/é😀', "a": [1, -5, True, None], "é": "x", "Z": {}}
    assert canonical(value) == rfc8785.dumps(value)


def test_non_bmp_keys_sorted_as_utf16() -> None:
    value = {"\U0001f600": 1, "\uffff": 2}
    assert canonical(value) == rfc8785.dumps(value)
