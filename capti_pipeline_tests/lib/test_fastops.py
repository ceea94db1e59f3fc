"""The vectorised helpers give exactly what the pandas operations they replace give."""

import pandas as pd
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as strat

from capti_pipeline.lib import fastops

# Short alphabets make repeats and shared prefixes common; lengths cross the 8-byte words.
texts = strat.text(alphabet="ab,é 0\u00a0", max_size=20)
columns = strat.lists(texts, max_size=60)


def as_str(values: list[str]) -> pd.Series:
    return pd.Series(values, dtype="str")


@settings(max_examples=300, deadline=None)
@given(values=columns)
def test_duplicated_is_pandas_duplicated_keep_false(values):
    series = as_str(values)
    expected = series.duplicated(keep=False)
    assert fastops.duplicated(series).tolist() == expected.tolist()


@settings(max_examples=200, deadline=None)
@given(values=columns)
def test_equal_strings_have_equal_fingerprints(values):
    series = as_str(values + values[::-1])
    prints = fastops.string_fingerprints(series)
    by_value: dict[str, int] = {}
    for value, fingerprint in zip(series, prints, strict=True):
        assert by_value.setdefault(value, int(fingerprint)) == int(fingerprint)


def test_fingerprints_tell_apart_strings_that_differ_past_the_first_word():
    values = ["abcdefgh", "abcdefghi", "abcdefgh\x00", "", "é", "e", "x" * 300, "x" * 299 + "y"]
    assert len(set(fastops.string_fingerprints(as_str(values)).tolist())) == len(values)


def test_fingerprints_of_sliced_and_chunked_arrays():
    whole = pa.array(["id-1", "id-22", "id-333", "id-4444"], type=pa.large_string())
    chunked = pa.chunked_array([whole.slice(1, 2), whole.slice(3)])
    expected = fastops.string_fingerprints(pa.array(["id-22", "id-333", "id-4444"]))
    assert fastops.string_fingerprints(chunked).tolist() == expected.tolist()


@settings(max_examples=200, deadline=None)
@given(values=columns)
def test_map_distinct_is_series_map(values):
    series = as_str(values)
    mapped = fastops.map_distinct(series, lambda v: v.strip().upper())
    assert mapped.tolist() == series.map(lambda v: v.strip().upper()).tolist()
    assert mapped.dtype == "str"
    unchanged = fastops.map_distinct(series, lambda v: v)
    assert unchanged is series  # nothing to change: no copy
