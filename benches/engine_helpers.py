#!/usr/bin/python3
"""Helpers for benches/engine.sh (run as root, with the system python3).

  sample EXE OUT [INTERVAL]    every INTERVAL s (0.05), until SIGTERM: the summed and the
                               largest RSS of all processes whose executable is EXE
                               (farm and its `farm __farm-userns` children); lines:
                               "time total_kb largest_kb count main_kb children_kb
                               dirty_kb cpu_busy_jiffies cpu_total_jiffies"
  machine SAMPLES [T0 T1]      "busy% dirty_mb_at_T0 dirty_mb_max": the whole machine's
                               CPU use and dirty page cache over [T0, T1]
  peak SAMPLES [T0 T1]         the peak RSS (MB) in [T0, T1] (all if not given): prints
                               "summed largest main children_summed"
  export-window LOG            in a stamped build log (each line "EPOCH text"), the export
                               of the last `run` layer: from the first process started in
                               the user namespace after "sandbox finished" (the write-tar
                               of the export) to the next one (the write-tar that applies
                               the change to the pool) or the layer's "built in" line,
                               whichever comes first; prints "t0 t1 seconds run_seconds
                               after_seconds" (after: export end to the "built in" line)
  extract LOG                  "count seconds": the "farm: extracting base layer" lines and
                               the time from each to the next process started in the user
                               namespace that is not its apply (the sandbox)
  layer-time LOG NAME          the layer's duration from farm's summary ("-" if not built)
  last-layer LAYOUT TAG        "mediaType digest" of the last layer of LAYOUT's image TAG
"""

import json
import os
import re
import signal
import sys
import time

STARTED = "started in user namespace"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def stamped(path):
    with open(path, errors="replace") as f:
        for line in f:
            ts, _, text = ANSI.sub("", line.rstrip("\n")).partition(" ")
            try:
                yield float(ts), text
            except ValueError:
                continue


def sample(exe, out, interval=0.05):
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    with open(out, "w") as f:
        while not stop:
            total = largest = count = main = 0
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    if os.readlink(f"/proc/{pid}/exe") != exe:
                        continue
                    with open(f"/proc/{pid}/cmdline", "rb") as c:
                        child = b"__farm-userns" in c.read()
                    with open(f"/proc/{pid}/status") as s:
                        for line in s:
                            if line.startswith("VmRSS:"):
                                kb = int(line.split()[1])
                                total += kb
                                largest = max(largest, kb)
                                count += 1
                                if not child:
                                    main = max(main, kb)
                                break
                except OSError:
                    continue
            dirty = 0
            with open("/proc/meminfo") as m:
                for line in m:
                    if line.startswith("Dirty:"):
                        dirty = int(line.split()[1])
                        break
            with open("/proc/stat") as st:
                cpu = [int(x) for x in st.readline().split()[1:]]
            idle = cpu[3] + cpu[4]  # idle + iowait
            f.write(f"{time.time():.3f} {total} {largest} {count} {main} {total - main} "
                    f"{dirty} {sum(cpu) - idle} {sum(cpu)}\n")
            f.flush()
            time.sleep(interval)


def peak(path, t0=None, t1=None):
    total = largest = main = children = 0
    with open(path) as f:
        for line in f:
            p = line.split()
            if len(p) < 4:
                continue
            t = float(p[0])
            if t0 is not None and not (t0 <= t <= t1):
                continue
            total = max(total, int(p[1]))
            largest = max(largest, int(p[2]))
            if len(p) >= 6:
                main = max(main, int(p[4]))
                children = max(children, int(p[5]))
    print(f"{total / 1024:.1f} {largest / 1024:.1f} {main / 1024:.1f} {children / 1024:.1f}")


def machine(path, t0=None, t1=None):
    """CPU busy % of the whole machine and dirty page cache (MB) over [t0, t1]."""
    rows = []
    with open(path) as f:
        for line in f:
            p = line.split()
            if len(p) < 9:
                continue
            t = float(p[0])
            if t0 is not None and not (t0 - 0.1 <= t <= t1 + 0.1):
                continue
            rows.append((t, int(p[6]), int(p[7]), int(p[8])))
    if len(rows) < 2:
        print("nan nan nan")
        return
    busy = (rows[-1][2] - rows[0][2]) / max(1, rows[-1][3] - rows[0][3]) * 100
    print(f"{busy:.0f} {rows[0][1] / 1024:.0f} {max(r[1] for r in rows) / 1024:.0f}")


def export_window(path):
    """t0 t1 export_s run_s after_s: see the module doc; after_s is from the end of the
    export to the layer's "built in" line (making the new chain in the pool)."""
    lines = list(stamped(path))
    last = None
    run_secs = float("nan")
    for i, (_, text) in enumerate(lines):
        if "sandbox finished" in text:
            last = i
            m = re.search(r"elapsed=([0-9.]+)(ms|µs|us|s)", text)
            if m:
                v = float(m.group(1))
                run_secs = v / 1000 if m.group(2) == "ms" else (
                    v / 1e6 if m.group(2) in ("µs", "us") else v)
    nan = float("nan")
    if last is None:
        print("nan nan nan nan nan")
        return
    starts = [t for t, text in lines[last + 1:] if STARTED in text]
    built = [t for t, text in lines[last + 1:] if re.search(r"\] built in ", text)]
    if not starts:
        print("nan nan nan nan nan")
        return
    t0 = starts[0]
    ends = [t for t in starts[1:2] + built[:1] if t >= t0]
    t1 = min(ends) if ends else nan
    after = built[0] - t1 if built else nan
    print(f"{t0:.3f} {t1:.3f} {t1 - t0:.3f} {run_secs:.3f} {after:.3f}")


def extract(path):
    lines = list(stamped(path))
    count = 0
    secs = 0.0
    for i, (t, text) in enumerate(lines):
        if "farm: extracting base layer" not in text:
            continue
        count += 1
        # The first start after the line is the apply; the next one is what follows.
        starts = [u for u, x in lines[i + 1:] if STARTED in x]
        end = starts[1] if len(starts) > 1 else (lines[-1][0] if lines else t)
        secs += end - t
    print(f"{count} {secs:.2f}")


def layer_time(path, name):
    found = "-"
    in_summary = False
    for _, text in stamped(path):
        if text.strip() == "summary:":
            in_summary = True
            continue
        if in_summary:
            p = text.split()
            if len(p) >= 3 and p[0] == name and p[1] == "built":
                found = p[2].rstrip("s")
    print(found)


def last_layer(layout, tag):
    with open(os.path.join(layout, "index.json")) as f:
        index = json.load(f)
    for m in index.get("manifests", []):
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            algo, hexd = m["digest"].split(":", 1)
            with open(os.path.join(layout, "blobs", algo, hexd)) as f:
                manifest = json.load(f)
            layer = manifest["layers"][-1]
            print(layer["mediaType"], layer["digest"])
            return
    sys.exit(f"no image tagged {tag} in {layout}")


def main(argv):
    cmd, args = argv[1], argv[2:]
    if cmd == "sample":
        sample(args[0], args[1], float(args[2]) if len(args) > 2 else 0.05)
    elif cmd == "peak":
        if len(args) >= 3 and args[1] != "nan" and args[2] != "nan":
            peak(args[0], float(args[1]), float(args[2]))
        else:
            peak(args[0])
    elif cmd == "machine":
        if len(args) >= 3 and args[1] != "nan" and args[2] != "nan":
            machine(args[0], float(args[1]), float(args[2]))
        else:
            machine(args[0])
    elif cmd == "export-window":
        export_window(args[0])
    elif cmd == "extract":
        extract(args[0])
    elif cmd == "layer-time":
        layer_time(args[0], args[1])
    elif cmd == "last-layer":
        last_layer(args[0], args[1])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
