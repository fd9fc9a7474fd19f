"""The ``qformats`` command: ``formats``, ``inspect SPEC``, ``eval`` (the main job), ``tune`` (per-site policies)."""
import argparse
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="qformats", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("formats", help="list every preset with bits/value, compression, max normal, error bound")
    p = sub.add_parser("inspect", help="explain one format (any spec string or preset name)")
    p.add_argument("spec")
    from .study import eval as eval_job  # light: transformers, tqdm and matplotlib are imported when the job runs

    from .study import tune as tune_job

    eval_job.add_eval_arguments(sub.add_parser("eval", help="perplexity under compressed TP all-reduce"))
    tune_job.add_tune_arguments(sub.add_parser("tune", help="per-site policies on the Pareto front of (wire bits, KL)"))
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
        return eval_job.main_eval(args, argv[argv.index("eval") + 1:]) or 0
    elif args.cmd == "tune":
        return tune_job.main_tune(args, argv[argv.index("tune") + 1:]) or 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
