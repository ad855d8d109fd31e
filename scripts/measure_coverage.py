"""Line and branch coverage of the package across every process the tests start (device daemons included).

    python scripts/measure_coverage.py [PYTEST ARGS...]        # the default test run; writes benchmarks/coverage.json

Device processes are separate Pythons: coverage starts in each through a `sitecustomize` on PYTHONPATH that
calls `coverage.process_startup()` (with COVERAGE_PROCESS_START set), each writes its own data file (a SIGTERM
from the launcher saves it too), and they are combined at the end. Needs the `coverage` package (the `dev` extra).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RCFILE = """\
[run]
source = meshllm
branch = True
parallel = True
sigterm = True
data_file = {data}

[report]
show_missing = True
skip_covered = False
"""


def main(argv: list[str]) -> int:
    try:
        import coverage
    except ImportError:
        print("coverage is not installed: pip install -e '.[dev]'", file=sys.stderr)
        return 2
    out = ROOT / "benchmarks" / "coverage.json"
    with tempfile.TemporaryDirectory(prefix="meshllm-coverage-") as tmp:
        tmp = Path(tmp)
        rc = tmp / "coveragerc"
        rc.write_text(RCFILE.format(data=tmp / ".coverage"))
        (tmp / "sitecustomize.py").write_text("import coverage\ncoverage.process_startup()\n")
        env = {**os.environ, "COVERAGE_PROCESS_START": str(rc),
               "PYTHONPATH": os.pathsep.join([str(tmp), *filter(None, [os.environ.get("PYTHONPATH")])])}
        code = subprocess.call([sys.executable, "-m", "pytest", *argv], cwd=ROOT, env=env)
        cov = coverage.Coverage(config_file=str(rc))
        cov.combine(data_paths=[str(tmp)])
        cov.save()
        total = cov.report(file=sys.stdout)
        report = tmp / "coverage.json"
        cov.json_report(outfile=str(report))
        data = json.loads(report.read_text())
    files = {str(Path(name).relative_to(ROOT)) if Path(name).is_absolute() else name: {
        "covered_lines": f["summary"]["covered_lines"], "num_statements": f["summary"]["num_statements"],
        "percent_covered": round(f["summary"]["percent_covered"], 1),
        "missing_lines": f["missing_lines"]} for name, f in data["files"].items()}
    summary = data["totals"]
    out.write_text(json.dumps({
        "command": " ".join(["python", "scripts/measure_coverage.py", *argv]),
        "pytest_exit_code": code,
        "coverage_version": coverage.__version__,
        "line_percent": round(100 * summary["covered_lines"] / max(1, summary["num_statements"]), 2),
        "branch_percent": round(100 * summary["covered_branches"] / max(1, summary["num_branches"]), 2),
        "combined_percent": round(total, 2),
        "totals": {k: summary[k] for k in ("covered_lines", "num_statements", "covered_branches", "num_branches")},
        "files": files,
    }, indent=1) + "\n")
    print(f"line coverage {100 * summary['covered_lines'] / max(1, summary['num_statements']):.1f}% across every "
          f"process; wrote {out.relative_to(ROOT)}")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
