"""CI time by origin: how much of a test run goes to the scenarios that existed at a base revision, and how
much to those added since (issue 25: "today's scenarios" within 30 minutes, everything within 45).

    python bench/ci_time/run.py test-results.xml [--base df536ae]

Reads pytest's JUnit XML (the README's test command writes test-results.xml; a test case's time there is
its setup, call and teardown, so a shared fixture's start counts to the first test that uses it) and asks
git whether each test function was defined anywhere under tests/ at BASE (a function that moved between
files still counts as existing; parametrized cases share their function's origin). Prints both sums, the
files that cost most in each, and the wall time of the whole run.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def defined_at(base: str) -> set[str]:
    """Names of the test functions defined under tests/ at `base`."""
    out = subprocess.run(
        ["git", "grep", "-h", "-E", r"^\s*(async\s+)?def test_", base, "--", "tests"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {m.group(1) for m in re.finditer(r"def (test_\w+)", out)}


def cases(xml: Path) -> list[tuple[str, str, float]]:
    """(file, function, seconds) of every test case in the report."""
    out = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        function = case.get("name", "").split("[", 1)[0]
        out.append((case.get("classname", ""), function, float(case.get("time", 0.0))))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path)
    parser.add_argument("--base", default="df536ae", help="the revision whose tests are 'today's scenarios'")
    args = parser.parse_args()
    existing = defined_at(args.base)
    sums: dict[str, float] = collections.Counter()
    files: dict[str, collections.Counter] = {"existing": collections.Counter(), "added": collections.Counter()}
    counts: dict[str, int] = collections.Counter()
    for module, function, seconds in cases(args.report):
        origin = "existing" if function in existing else "added"
        sums[origin] += seconds
        counts[origin] += 1
        files[origin][module] += seconds
    suite = ET.parse(args.report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    wall = float(suite.get("time", 0.0)) if suite is not None else 0.0
    print(f"whole run: {wall / 60:.1f} min ({sum(counts.values())} test cases)")
    for origin in ("existing", "added"):
        label = f"at {args.base}" if origin == "existing" else f"added since {args.base}"
        print(f"tests {label}: {sums[origin] / 60:.1f} min ({counts[origin]} test cases)")
        for module, seconds in files[origin].most_common(8):
            print(f"  {seconds:7.1f} s  {module}")


if __name__ == "__main__":
    sys.exit(main())
