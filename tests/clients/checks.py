"""The pass/fail counter the check scripts of this folder share: each check
prints a FAIL line with its detail; `done()` prints "N passed, M failed" (what
tests/common/mod.rs `run_checks` looks for) and exits non-zero on a failure."""
import sys

passed = failed = 0


def check(name, ok, detail=""):
    global passed, failed
    if ok:
        passed += 1
    else:
        failed += 1
        print(f"FAIL {name}: {detail}")


def done():
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
