#!/usr/bin/env python3
"""Writes the hand-built NMEA logs of agent/tests/gps_rules.rs: one per validity rule or
receiver style (see README.md beside this file). Deterministic: after an edit, run it
again and commit the logs it writes.

    python3 agent/tests/data/nmea/rules/make_rule_logs.py

Each cycle is preceded by a comment saying what the agent must do with it (gpsd's
gpsfake and the agent's file reader skip `#` lines):

    # cycle N: fix lat=.. lon=.. time=..      the agent reports this position at this time
    # cycle N: reject=REASON [lat=.. lon=..]  the agent reports nothing and counts REASON
    ... gpsd=fix -- why                       gpsd 3.22 reports a 2D/3D fix for this cycle
                                              although the agent rejects it

`time=` is the full UTC time once the receiver has given a date (a valid RMC, or a ZDA)
and only the time of day (`T10:00:04.000`) before that. Every cycle has a position of its
own (0.0001 degree apart), so the test matches fixes to cycles by position. The verdicts
are written here case by case from the rules in agent/src/gps/nmea.rs, not computed.
"""
import functools
import operator
import os

HERE = os.path.dirname(os.path.abspath(__file__))
DAY = (20, 5, 2025)  # the date of every dated log (day, month, year)
PRNS = ["05", "07", "13", "15", "17", "19", "24", "28"]


def sentence(body):
    cs = functools.reduce(operator.xor, body.encode(), 0)
    return f"${body}*{cs:02X}"


def lat_field(d):
    a = abs(d)
    deg = int(a)
    return f"{deg:02d}{(a - deg) * 60:08.5f},{'S' if d < 0 else 'N'}"


def lon_field(d):
    a = abs(d)
    deg = int(a)
    return f"{deg:03d}{(a - deg) * 60:08.5f},{'W' if d < 0 else 'E'}"


def tod_ms(t):
    return round(t * 1000) % 86_400_000


def hms(t):
    h, rest = divmod(tod_ms(t), 3_600_000)
    m, rest = divmod(rest, 60_000)
    return f"{h:02d}{m:02d}{rest // 1000:02d}.{rest % 1000:03d}"


def iso_tod(t):
    h, rest = divmod(tod_ms(t), 3_600_000)
    m, rest = divmod(rest, 60_000)
    return f"{h:02d}:{m:02d}:{rest // 1000:02d}.{rest % 1000:03d}"


def day_of(t):
    """The date at t seconds after 2025-05-20T00:00:00Z (t < 2 days)."""
    return DAY if t < 86_400 else (DAY[0] + 1, DAY[1], DAY[2])


def burst(order, t, pos, talker, o):
    """The sentences of one cycle, a valid 3D fix unless `o` says otherwise.

    order: sentence types; "GGA/GL" = a GGA with talker GL, "GSA/BD" likewise.
    o: q (GGA quality), sats (GGA/GNS count, or {talker: count}), hdop, st (RMC status),
    rmode (RMC mode), gll (GLL status), gllmode, gnsmode, gnsnav (GNS navigation
    status), gsa (GSA fix mode), nopos (types printed without a position), times
    ({type: t} for a time other than the cycle's)."""
    out = []
    d, m, y = day_of(t)
    for entry in order:
        k, _, tk = entry.partition("/")
        tk = tk or talker
        tt = hms(o.get("times", {}).get(k, t))
        p = ",,," if k in o.get("nopos", ()) else f"{lat_field(pos[0])},{lon_field(pos[1])}"
        hdop = o.get("hdop", "0.9")
        sats = o.get("sats", "08")
        if isinstance(sats, dict):
            sats = sats.get(tk, "")
        if k == "GGA":
            out.append(sentence(f"{tk}GGA,{tt},{p},{o.get('q', 1)},{sats},{hdop},12.0,M,46.9,M,,"))
        elif k == "RMC":
            out.append(sentence(f"{tk}RMC,{tt},{o.get('st', 'A')},{p},0.10,45.0,"
                                f"{d:02d}{m:02d}{y % 100:02d},,,{o.get('rmode', 'A')}"))
        elif k == "VTG":
            out.append(sentence(f"{tk}VTG,45.0,T,,M,0.10,N,0.19,K,A"))
        elif k == "GSA":
            mode = o.get("gsa", 3)
            prns = ((PRNS if mode > 1 else []) + [""] * 12)[:12]
            pdop, vdop = ("99.99", "99.99") if hdop == "99.99" else ("1.6", "1.3")
            if hdop == "":
                pdop = vdop = ""
            out.append(sentence(f"{tk}GSA,A,{mode},{','.join(prns)},{pdop},{hdop},{vdop}"))
        elif k == "GSV":
            out.append(sentence(f"{tk}GSV,1,1,04,05,40,083,46,07,20,300,40,13,55,150,44,15,10,210,38"))
        elif k == "GLL":
            out.append(sentence(f"{tk}GLL,{p},{tt},{o.get('gll', 'A')},{o.get('gllmode', 'A')}"))
        elif k == "GNS":
            out.append(sentence(f"{tk}GNS,{tt},{p},{o.get('gnsmode', 'AANN')},{sats},{hdop},"
                                f"12.0,46.9,,,{o.get('gnsnav', 'S')}"))
        elif k == "ZDA":
            out.append(sentence(f"{tk}ZDA,{tt},{d:02d},{m:02d},{y},00,00"))
        else:
            raise ValueError(entry)
    return out


def write(name, title, order, talker, cases, t0=36000.0, step=1.0, lat0=52.0, lon0=4.5):
    """cases: (overrides, verdict, gpsd_note). verdict is "fix" or a reject reason;
    gpsd_note is None where gpsd 3.22 decides as the agent does, else why it reports a
    fix anyway. Overrides may also set `order`, `talker` and `at` (the cycle's time, for
    a clock that steps back or stops)."""
    lines = [f"# {title}",
             "# Hand-built by make_rule_logs.py (fleetsync, Apache-2.0); see README.md here."]
    date_known = False
    for n, (o, verdict, gpsd_note) in enumerate(cases):
        t = o.get("at", round(t0 + n * step, 3))
        pos = (round(lat0 - n * 0.0001 if lat0 < 0 else lat0 + n * 0.0001, 7), lon0)
        order_n = o.get("order", order)
        types = [e.partition("/")[0] for e in order_n]
        date_known = date_known or ("RMC" in types and o.get("st", "A") in "AD") or "ZDA" in types
        words = ["fix" if verdict == "fix" else f"reject={verdict}"]
        if any(k in types and k not in o.get("nopos", ()) for k in ("GGA", "RMC", "GNS", "GLL")):
            words.append(f"lat={pos[0]:.7f} lon={pos[1]:.7f}")
        if verdict == "fix":
            d, m, y = day_of(t)
            words.append(f"time={y:04d}-{m:02d}-{d:02d}T{iso_tod(t)}Z" if date_known
                         else f"time=T{iso_tod(t)}")
        if gpsd_note:
            words.append(f"gpsd=fix -- {gpsd_note}")
        lines.append(f"# cycle {n}: {' '.join(words)}")
        lines.extend(burst(order_n, t, pos, o.get("talker", talker), o))
    with open(os.path.join(HERE, name), "w") as f:
        f.write("\n".join(lines) + "\n")


OK = ({}, "fix", None)
UBLOX = ["RMC", "VTG", "GGA", "GSA", "GSV"]
SIRF = ["GGA", "GSA", "GSV", "RMC"]
TELIT = ["GGA", "GLL", "GSA", "RMC", "VTG"]
RMC_MODE = "3.22 reads RMC's mode indicator as a status, never as the mode"
RMC_LAST = "the RMC that ends the cycle sets 3.22's mode again"
NO_DOP = "3.22 does not look at the DOPs to decide the mode"


def main():
    write("rule-gga-quality.log", "GGA fix quality (rule 5): u-blox M8 order without GLL, GN talker",
          UBLOX, "GN", [
              OK, OK, OK,
              ({"q": 0, "nopos": ["GGA"], "sats": ""}, "gga_quality", None),
              OK,
              ({"q": 0}, "gga_quality", "3.22 takes GGA's mode from its position fields, not its quality"),
              ({"q": 6}, "gga_quality", "3.22 reports a dead-reckoning GGA (quality 6) as a fix"),
              OK,
              ({"q": 2}, "fix", None),
              OK,
          ])
    write("rule-gsa.log", "GSA fix mode (rule 6): SiRF order, GP talker",
          SIRF, "GP", [
              OK, OK, OK,
              ({"gsa": 1}, "gsa_no_fix", RMC_LAST),
              OK,
              ({"q": 0, "sats": "00", "gsa": 1, "st": "V", "nopos": ["GGA", "RMC"], "hdop": ""},
               "no_position", None),
              ({"gsa": 2}, "fix", None),
              OK,
          ])
    write("rule-rmc.log", "RMC status and mode (rules 3, 4): Telit HE910 order, GP talker",
          TELIT, "GP", [
              OK, OK, OK,
              ({"st": "V"}, "status_invalid", None),
              OK,
              ({"rmode": "N"}, "mode_invalid", RMC_MODE),
              ({"rmode": "E"}, "mode_invalid", RMC_MODE),
              ({"st": "D", "rmode": "D"}, "fix", None),
              OK,
          ])
    write("rule-gll.log", "GLL status and mode (rules 3, 4): u-blox M8 order with GLL, GN talker",
          UBLOX + ["GLL"], "GN", [
              OK, OK, OK,
              ({"gll": "V"}, "status_invalid", None),
              OK,
              ({"gllmode": "N"}, "mode_invalid", None),
              OK,
          ])
    write("rule-gns.log", "GNS mode per constellation (rule 4): SiRF TriG order, GN and BD talkers",
          ["GGA", "GNS", "GSA/GP", "GSA/BD", "RMC"], "GN", [
              OK, OK, OK,
              ({"gnsmode": "NNNN"}, "mode_invalid", RMC_LAST),
              ({"gnsmode": "NANN"}, "fix", None),
              ({"gnsnav": "V"}, "mode_invalid",
               "3.22 skips a GNS marked not valid for navigation; " + RMC_LAST),
              OK,
              ({"q": 0, "sats": "00", "gsa": 1, "gnsmode": "NNNN", "st": "V",
                "nopos": ["GGA", "GNS", "RMC"], "hdop": ""}, "no_position", None),
              OK,
          ])
    sirfv = ["GGA/GP", "GGA/GL", "GSA/GN", "RMC/GN"]

    def sats(gp, gl):
        return {"sats": {"GP": gp, "GL": gl}}
    write("rule-satellites.log",
          "Satellites used (rule 7): SiRFstarV order, per-constellation GPGGA + GLGGA, GNGSA, GNRMC",
          sirfv, "GP", [
              (sats("08", "02"), "fix", None), (sats("08", "02"), "fix", None),
              (sats("08", "02"), "fix", None),
              (sats("02", "02"), "fix", None),
              (sats("01", "01"), "few_satellites", RMC_LAST),
              (sats("10", "05"), "fix", None),
              (sats("00", "00"), "few_satellites", RMC_LAST),
              (sats("08", "02"), "fix", None),
          ])
    write("rule-hdop.log", "HDOP range (rule 8): u-blox M8 order without GLL, GN talker",
          UBLOX, "GN", [
              OK, OK, OK,
              ({"hdop": "99.99", "sats": "04"}, "hdop_out_of_range", NO_DOP),
              OK,
              ({"hdop": "0.0"}, "hdop_out_of_range", NO_DOP),
              ({"hdop": "25.0"}, "fix", None),
              OK,
          ])
    write("rule-time.log",
          "Times that disagree within a cycle (rule 1): a stale GGA in a u-blox M8 burst, GN talker",
          UBLOX, "GN", [
              OK, OK, OK,
              ({"times": {"GGA": 36002.0}}, "time_mismatch",
               "3.22 reports the cycle, stamped with the stale GGA's time"),
              OK, OK,
          ])
    write("rule-time-step.log",
          "A whole burst whose time steps back 300 ms (Telit HE910 resync) is a cycle of its own: Telit order, GP",
          TELIT, "GP", [OK, OK, OK, ({"at": 36002.7}, "fix", None), OK, OK])
    frozen = "3.22 latches no-fix on a GGA time that does not advance, then the GGA's position sets 2D/3D again"
    write("rule-time-frozen.log",
          "A receiver clock that stops (rule 1): GGA + GSA only (Trimble Placer 450), GP talker, no date",
          ["GGA", "GSA"], "GP", [
              OK, OK, OK, OK,
              ({"at": 36003.0}, "time_mismatch", frozen),
              ({"at": 36003.0}, "time_mismatch", frozen),
              OK, OK,
          ])
    no_date = {"order": ["GGA", "GSA"]}
    write("receiver-gga-only.log",
          "GGA + GSA without RMC, no date until ZDA appears (Trimble style), GP talker; rules 2 and 7",
          ["GGA", "GSA", "ZDA"], "GP", [
              (no_date, "fix", None), (no_date, "fix", None), (no_date, "fix", None),
              ({**no_date, "q": 0, "nopos": ["GGA"], "sats": "00", "gsa": 1, "hdop": ""},
               "no_position", None),
              ({**no_date, "sats": "02"}, "few_satellites", None),
              ({**no_date, "sats": "00"}, "few_satellites", None),
              (no_date, "fix", None),
              OK, OK,
              ({"sats": "02"}, "few_satellites", None),
              OK,
          ])
    write("receiver-rmc-only.log", "RMC without GGA (Magellan EC-10X style), GP talker",
          ["RMC"], "GP", [
              OK, OK, OK,
              ({"st": "V", "nopos": ["RMC"]}, "no_position", None),
              ({"st": "V"}, "status_invalid", None),
              OK,
              ({"rmode": "N"}, "mode_invalid", RMC_MODE),
              OK,
          ])
    lost = {"q": 0, "sats": "00", "st": "V", "nopos": ["RMC", "GGA"], "hdop": ""}
    write("receiver-10hz.log",
          "A 10 Hz receiver (RMC + GGA, GN talker) across midnight with a 0.3 s loss, south and west",
          ["RMC", "GGA"], "GN",
          [OK] * 6 + [(lost, "no_position", None)] * 3 + [OK] * 6,
          t0=86_399.2, step=0.1, lat0=-33.45, lon0=-70.66)
    talkers = []
    for tk in ["GP", "GL", "GA", "BD", "GN"]:
        talkers += [({"talker": tk}, "fix", None)] * 2
    talkers.insert(8, ({"talker": "BD", **lost}, "no_position", None))
    write("receiver-talkers.log",
          "Talker ids GP, GL (GLONASS), GA (Galileo), BD (BeiDou), GN: GGA + RMC, south and west",
          ["GGA", "RMC"], "GP", talkers, lat0=-33.45, lon0=-70.66)


if __name__ == "__main__":
    main()
