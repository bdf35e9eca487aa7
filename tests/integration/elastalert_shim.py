"""Run ElastAlert2's own rule engine over a past range and print every match, one JSON object a line.

Run by ElastAlert2's interpreter (var/elastalert2/bin/python), not sentinel's: it imports only ElastAlert2.
It does what ``elastalert --start/--end`` would do if that command ran a past range (it exits when the end
is before its next run time): ``ElastAlerter.run_rule(rule, end, start)`` for each rule, which queries in
segments of ``buffer_time``, feeds the rule type, garbage-collects at each segment's end and sends each
match that ``realert`` lets through. Two stand-ins, both outside the rule logic:
- ``GET /`` (the server's version) is not served by Elasticsearch's integration-test distribution (it has
  no ``rest-root`` module), so the version is given: ``--es-version``;
- ``send_alert`` records the match instead of alerting (``--debug`` mode, as ``elastalert-test-rule``).

Usage: python elastalert_shim.py --config CONFIG --start ISO --end ISO --es-version 8.17.4
"""

from __future__ import annotations

import argparse
import json
import sys

import elastalert.util as util


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--start", required=True)
    p.add_argument("--end", required=True)
    p.add_argument("--es-version", required=True)
    a = p.parse_args()
    util.get_version_from_cluster_info = lambda client: a.es_version

    from elastalert.elastalert import ElastAlerter

    client = ElastAlerter(["--config", a.config, "--debug"])
    found = []

    def record(matches: list[dict], rule: dict, alert_time: object = None, retried: bool = False) -> None:
        for m in matches:
            found.append({"rule": rule["name"], "match": m})

    client.send_alert = record  # type: ignore[method-assign]
    # when each match was made: the end of the query segment being fed (or garbage-collected) at the time.
    # ElastAlert2's match carries an event's timestamp, which for spike is the oldest of its current window
    segment_end: dict[str, object] = {}
    run_query = client.run_query

    def tracked_query(rule: dict, start: object, end: object, *args: object, **kwargs: object) -> object:
        segment_end[rule["name"]] = end
        return run_query(rule, start, end, *args, **kwargs)

    client.run_query = tracked_query  # type: ignore[method-assign]
    start, end = util.ts_to_dt(a.start), util.ts_to_dt(a.end)
    for rule in client.rules:
        rule_type = rule["type"]
        add_match = rule_type.add_match

        def tracked_match(match: dict, *args: object, _name: str = rule["name"], _add: object = add_match,
                          **kwargs: object) -> None:
            match = dict(match)
            match["_detected_at"] = util.dt_to_ts(segment_end[_name])
            _add(match, *args, **kwargs)  # type: ignore[operator]

        rule_type.add_match = tracked_match
        client.run_rule(rule, end, start)
    for f in found:
        sys.stdout.write(json.dumps(f, default=str) + "\n")


if __name__ == "__main__":
    main()
