#!/usr/bin/env python3
"""Exit 1 unless a pytest JUnit XML report shows at least one test that ran (not skipped).

pytest itself exits 5 when nothing is collected but 0 when everything is skipped; `make test`
uses this to treat "all skipped" as a failure too.
"""
import sys
import xml.etree.ElementTree as ET


def main(path: str) -> int:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    tests = sum(int(s.get("tests", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    ran = tests - skipped
    if ran <= 0:
        print(f"check_tests_ran: no test ran ({tests} collected, {skipped} skipped)",
              file=sys.stderr)
        return 1
    print(f"check_tests_ran: {ran} tests ran ({skipped} skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
