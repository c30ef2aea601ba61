#!/usr/bin/env python3
"""Independent oracle for agent/tests/gps_nmea_logs.rs.

Decodes an NMEA log with pynmea2 (not the Rust `nmea` crate the agent uses) and writes
one CSV row per fix epoch: the first valid position of each run of sentences sharing a
UTC time. Run once per log; the CSVs are committed beside the logs:

    pip install pynmea2==1.19.0
    for f in agent/tests/data/nmea/*.log; do
        python3 agent/tests/data/nmea/oracle_pynmea2.py "$f" > "${f%.log}.expected.csv"
    done

Columns: date (YYYY-MM-DD, empty while the log has given no date yet), time-of-day in ms
UTC, latitude and longitude in degrees (9 decimals).
"""
import sys

import pynmea2


def valid(msg):
    kind = msg.sentence_type
    if kind == "GGA":
        return msg.gps_qual is not None and int(msg.gps_qual or 0) > 0
    if kind == "RMC":
        return msg.status == "A"
    if kind == "GLL":
        return msg.status == "A"
    if kind == "GNS":
        return bool(msg.mode_indicator) and any(c not in "N" for c in msg.mode_indicator)
    return False


def main(path):
    date = None
    rows = []
    current = None  # [time, date, lat, lon]
    last_time = object()
    with open(path, encoding="ascii", errors="replace") as f:
        for raw in f:
            line = raw.strip()
            if not line.startswith("$"):
                continue
            try:
                msg = pynmea2.parse(line, check=True)
            except (pynmea2.ParseError, pynmea2.ChecksumError, ValueError):
                continue
            kind = getattr(msg, "sentence_type", None)
            if kind == "ZDA" and msg.datestamp:
                date = msg.datestamp
            if kind not in ("GGA", "RMC", "GLL", "GNS"):
                continue
            ts = msg.timestamp
            if ts != last_time:
                if current is not None and current[2] is not None:
                    rows.append(current)
                current = [ts, None, None, None]
                last_time = ts
            if kind == "RMC" and msg.datestamp:
                date = msg.datestamp
            current[1] = date
            if current[2] is None and valid(msg) and msg.lat and msg.lon and ts is not None:
                current[2] = msg.latitude
                current[3] = msg.longitude
    if current is not None and current[2] is not None:
        rows.append(current)
    print("date,tod_ms,lat,lon")
    for ts, d, lat, lon in rows:
        tod = ((ts.hour * 60 + ts.minute) * 60 + ts.second) * 1000 + round(ts.microsecond / 1000)
        print(f"{d.isoformat() if d else ''},{tod},{lat:.9f},{lon:.9f}")


if __name__ == "__main__":
    main(sys.argv[1])
