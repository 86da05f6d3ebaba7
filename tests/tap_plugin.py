"""tap_plugin — a pytest plugin that prints TAP ("ok N - test", "not ok N - test") on stdout.

Loaded by tests/pytest-tap with `-p tap_plugin`. Each test's outcome becomes one TAP line;
a failure adds its report as "# " comment lines, a skip becomes "ok N - name # SKIP reason".
tests/pytest-tap gives us fd 3 as stdout and sends pytest's report to stderr.
"""
import os

_count = 0
# tests/pytest-tap opens fd 3 on the real stdout and sends pytest's own output to stderr.
_out = os.fdopen(3, "w") if os.path.exists("/proc/self/fd/3") else open(os.devnull, "w")


def _emit(line):
    _out.write(line + "\n")
    _out.flush()


def pytest_runtest_logreport(report):
    global _count
    name = report.nodeid.split("::", 1)[-1]
    if report.when == "call" or (report.when == "setup" and not report.passed):
        _count += 1
        if report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else "skipped"
            _emit("ok %d - %s # SKIP %s" % (_count, name, str(reason).replace("\n", " ")))
        elif report.passed:
            _emit("ok %d - %s" % (_count, name))
        else:
            _emit("not ok %d - %s" % (_count, name))
            for line in str(report.longrepr).splitlines()[-60:]:
                _emit("#   " + line)
    elif report.when == "teardown" and report.failed:
        _count += 1
        _emit("not ok %d - %s (teardown)" % (_count, name))
        for line in str(report.longrepr).splitlines()[-30:]:
            _emit("#   " + line)


def pytest_collectreport(report):
    global _count
    if report.failed:
        _count += 1
        _emit("not ok %d - collect %s" % (_count, report.nodeid))
        for line in str(report.longrepr).splitlines()[-30:]:
            _emit("#   " + line)


def pytest_sessionfinish(session, exitstatus):
    if _count == 0:
        _emit("not ok 1 - no tests ran (exit status %s)" % exitstatus)
        _emit("1..1")
    else:
        _emit("1..%d" % _count)
