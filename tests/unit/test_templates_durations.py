from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sentinel.alerts.templates import check, expand, humanize, humanize_duration
from sentinel.durations import format_duration, parse_duration


@pytest.mark.parametrize(("text", "seconds"), [("0s", 0), ("500ms", 0.5), ("5m", 300), ("1h30m", 5400),
                                                ("1d", 86400), ("2w", 14 * 86400), ("1m30s500ms", 90.5)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "5", "5 m", "1.5m", "-1s", "m5", "5mm"])
def test_parse_duration_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(bad)


@given(st.integers(min_value=0, max_value=10**10))
def test_duration_round_trip(ms: int) -> None:
    assert parse_duration(format_duration(ms / 1000)) == pytest.approx(ms / 1000)


@pytest.mark.parametrize(("tmpl", "out"), [
    ("{{ $labels.replica }} is {{ $value }}", "r0 is 0.734"),
    ("{{ $value | humanizeDuration }}", "734ms"),
    ("{{ humanizePercentage $value }}", "73.4%"),
    ('{{ printf "%.1f" $value }}', "0.7"),
    ("{{ .Labels.replica }}/{{ $labels.missing }}", "r0/"),
    ("{{ $externalLabels.cluster }}", "c1"),
    ('{{ "a|b" | toUpper }}', "A|B"),
    ("no actions", "no actions"),
])
def test_expand(tmpl: str, out: str) -> None:
    assert expand(tmpl, {"replica": "r0"}, 0.734, {"cluster": "c1"}) == out


@pytest.mark.parametrize("tmpl", ["{{ $nope }}", "{{ humanize }}", "{{ $value", "{{ unknownFunc $value }}",
                                  '{{ "open }}', "{{ $value | $labels.x }}"])
def test_broken_templates_render_visible_errors(tmpl: str) -> None:
    out = expand(tmpl, {"x": "y"}, 1.0)
    assert out.startswith("<error expanding template:"), out
    assert check(tmpl) is not None


def test_humanize_like_prometheus() -> None:
    assert humanize(1234567) == "1.235M"
    assert humanize(0.001) == "1m"
    assert humanize_duration(3725) == "1h 2m 5s"
    assert humanize_duration(90061) == "1d 1h 1m 1s"
    assert humanize_duration(1.5) == "1.5s"


def test_series_and_value_notation() -> None:
    from sentinel.alerts.templates import go_float
    from sentinel.rules.series import expand_values, parse_series

    assert parse_series('up{job="a", instance="x:1"}') == {"__name__": "up", "job": "a", "instance": "x:1"}
    assert parse_series('{__name__="m", a="q\\"uote"}') == {"__name__": "m", "a": 'q"uote'}
    assert expand_values("1+2x3 _ 5 _x2 stale 10-1x2 3x1 -Inf") == [
        1.0, 3.0, 5.0, 7.0, None, 5.0, None, None, "stale", 10.0, 9.0, 8.0, 3.0, 3.0, float("-inf")]
    assert [go_float(v) for v in (0.734, 1e6, 123456.0, 1e-05, 50.0, -3.0)] == [
        "0.734", "1e+06", "123456", "1e-05", "50", "-3"]
