"""The SVG charts are well-formed, escape their text and draw what they are given."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from app.dashboard.charts import _nice_range, bar_chart, interval_chart, line_chart

SVG = "{http://www.w3.org/2000/svg}"


def test_line_chart_is_valid_svg_with_one_polyline_per_series():
    svg = line_chart({"loss": [(0, 1.0), (1, 0.5)], "reward": [(0, -1), (1, 0.2)]}, title="curves")
    root = ET.fromstring(svg)
    assert len(root.findall(f"{SVG}polyline")) == 2


def test_text_is_escaped():
    svg = bar_chart(["<b>&"], {"a<script>": [1.0]}, title="t<&>")
    ET.fromstring(svg)  # would raise on raw < or &
    assert "<script>" not in svg and "&lt;b&gt;&amp;" in svg


def test_interval_chart_draws_a_whisker_per_snapshot_and_metric():
    m = {"value": 0.5, "ci_low": 0.4, "ci_high": 0.6}
    svg = interval_chart(["correct", "parse_rate"], {"v1": {"correct": m, "parse_rate": m},
                                                     "v0": {"correct": m}}, title="x")
    assert len(ET.fromstring(svg).findall(f"{SVG}circle")) == 3


def test_empty_data_says_so():
    assert "no data" in line_chart({}, title="t")


def test_axis_range_lands_on_round_steps():
    assert _nice_range(0.0, 0.75) == (0.0, 0.8, 0.2)
    assert _nice_range(-1.0, 1.0) == (-1.0, 1.0, 0.5)


def test_gridline_labels_keep_the_decimals_their_step_needs():
    # A reward curve flat around -0.58: five distinct labels, not "-0.57, -0.57, -0.58…".
    svg = line_chart({"run": [(1, -0.571), (2, -0.589)]}, title="reward")
    labels = [t.text for t in ET.fromstring(svg).iter(f"{SVG}text")
              if t.get("text-anchor") == "end" and t.text and t.text.startswith("-0.5")]
    assert len(labels) == len(set(labels)) >= 4, labels


def test_a_long_run_is_a_line_without_a_marker_per_step():
    svg = line_chart({"run": [(k, 1 / k) for k in range(1, 201)]}, title="loss",
                     x_label="optimizer step")
    root = ET.fromstring(svg)
    assert len(root.findall(f"{SVG}polyline")) == 1 and not root.findall(f"{SVG}circle")
    assert "optimizer step" in svg and ">200<" in svg  # integer step ticks
