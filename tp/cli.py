"""The ``qformats`` command: ``formats``, ``inspect SPEC``, ``eval`` (the main job)."""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="qformats", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("formats", help="list every preset with bits/value, compression, max normal, error bound")
    p = sub.add_parser("inspect", help="explain one format (any spec string or preset name)")
    p.add_argument("spec")
    try:
        from .study import eval as eval_job
    except ImportError as exc:  # eval needs the [eval] extras
        eval_job, eval_error = None, exc
    if eval_job is not None:
        eval_job.add_eval_arguments(sub.add_parser("eval", help="perplexity under compressed TP all-reduce"))
    args = parser.parse_args(argv)
    if args.cmd == "formats":
        from qformats.describe import format_table

        print(format_table())
    elif args.cmd == "inspect":
        from qformats.describe import explain

        try:
            print(explain(args.spec))
        except ValueError as exc:
            print(f"qformats inspect: {exc}", file=sys.stderr)
            return 2
    elif args.cmd == "eval":
        return eval_job.main_eval(args) or 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
