"""``python -m testbed.report render RUN_DIR`` and ``python -m testbed.report summary REPORTS_ROOT``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from testbed.report import EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.report", description="Write testbed's HTML reports.")
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render", help="write RUN_DIR/report.html from its report.json and console.log")
    render.add_argument(
        "run_dir", type=Path, metavar="RUN_DIR", help="a run directory, e.g. reports/qemu-x86_64/latest"
    )
    render.add_argument("-o", "--output", type=Path, help="write here instead of RUN_DIR/report.html")
    summary = sub.add_parser("summary", help="write the farm summary of the latest run of every device")
    summary.add_argument("reports_root", type=Path, metavar="REPORTS_ROOT", help="the reports/ directory")
    summary.add_argument("-o", "--output", type=Path, default=None, help="default: REPORTS_ROOT/summary.html")
    summary.add_argument(
        "--previous", type=Path, help="compare with the latest runs under this older reports directory"
    )
    summary.add_argument("--no-render", action="store_true", help="do not write missing report.html of latest runs")
    args = parser.parse_args(argv)

    # Imported here so that `--help` works even where Jinja2 is missing.
    from testbed.report.html import ReportError, render_html
    from testbed.report.summary import render_summary

    try:
        if args.command == "render":
            if not args.run_dir.is_dir():
                raise ReportError(f"{args.run_dir}: no such run directory")
            if not (args.run_dir / "report.json").is_file():
                raise ReportError(f"{args.run_dir / 'report.json'}: no such file (is {args.run_dir} a run directory?)")
            out = render_html(args.run_dir, args.output)
        else:
            out = render_summary(
                args.reports_root,
                args.output or args.reports_root / "summary.html",
                previous=args.previous,
                render_missing=not args.no_render,
            )
    except ReportError as exc:
        print(f"testbed.report: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"testbed.report: error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
