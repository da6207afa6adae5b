#!/usr/bin/env python3
"""Line coverage per file, and the floors of .ci/coverage checked.

Reads the summary that `cargo llvm-cov report --json --summary-only` wrote,
prints the coverage of every file of the library under src/ (the engine's
files marked), then the library's and the engine's totals. The engine is
the folder `ENGINE` in tests/layers.rs, the one the layering test guards.
Exits 1, naming the figure, when a total falls below its floor.
"""
import json
import re
import sys
from pathlib import Path


def floors(path):
    out = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, value = line.split()
            out[name] = float(value)
    return out


def engine_files(layers):
    text = Path(layers).read_text()
    folder = re.search(r'const ENGINE: &str = "(src/[^"]+)";', text)
    if not folder:
        sys.exit(f"{layers}: no `const ENGINE` folder to read the engine's files from")
    return {p.as_posix() for p in Path(folder.group(1)).rglob("*.rs")}


def main():
    summary, floor_file, layers = sys.argv[1:4]
    root = Path.cwd().resolve()
    engine = engine_files(layers)
    data = json.loads(Path(summary).read_text())["data"][0]["files"]
    rows = []
    for f in data:
        rel = Path(f["filename"]).resolve().relative_to(root).as_posix() \
            if Path(f["filename"]).resolve().is_relative_to(root) else None
        if rel is None or not rel.startswith("src/"):
            continue
        lines = f["summary"]["lines"]
        rows.append((rel, lines["count"], lines["covered"]))
    rows.sort()
    totals = {"library": [0, 0], "engine": [0, 0]}
    print(f"{'line coverage':<44} {'lines':>7} {'missed':>7} {'cover':>7}")
    for rel, count, covered in rows:
        pct = 100.0 * covered / count if count else 100.0
        mark = " (engine)" if rel in engine else ""
        print(f"{rel:<44} {count:>7} {count - covered:>7} {pct:>6.2f}%{mark}")
        totals["library"][0] += count
        totals["library"][1] += covered
        if rel in engine:
            totals["engine"][0] += count
            totals["engine"][1] += covered
    missing = sorted(engine - {r[0] for r in rows})
    if missing:
        print(f"engine files with no executable lines: {', '.join(missing)}")
    # Per module: a directory under src/ (`queue/core`, `cli`) or a file
    # at its top (`store`).
    modules = {}
    for rel, count, covered in rows:
        parts = rel[len("src/"):].split("/")
        name = "/".join(parts[:-1]) if len(parts) > 1 else parts[0].removesuffix(".rs")
        m = modules.setdefault(name, [0, 0])
        m[0] += count
        m[1] += covered
    print()
    print(f"{'by module':<44} {'lines':>7} {'missed':>7} {'cover':>7}")
    for name, (count, covered) in sorted(modules.items()):
        pct = 100.0 * covered / count if count else 100.0
        print(f"{name:<44} {count:>7} {count - covered:>7} {pct:>6.2f}%")
    print()
    want = floors(floor_file)
    failed = False
    for name, (count, covered) in totals.items():
        pct = 100.0 * covered / count if count else 100.0
        floor = want.get(name)
        verdict = ""
        if floor is not None and pct + 1e-9 < floor:
            verdict = f"  BELOW the floor of {floor:.2f}% in {floor_file}"
            failed = True
        elif floor is not None:
            verdict = f"  (floor {floor:.2f}%)"
        print(f"{name} line coverage: {pct:.2f}% of {count} lines{verdict}")
    if failed:
        print(
            "coverage fell: add tests that exercise the new code, "
            f"or, if the drop is deliberate, lower the floor in {floor_file} and say why in the commit",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
