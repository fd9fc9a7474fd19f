"""The ``qformats`` command: ``formats``, ``inspect SPEC``, ``eval`` (the main job), ``tune`` (per-site policies).

Only the subcommand that runs is imported: ``formats``, ``inspect`` and ``--help`` need the
formats alone (qformats, pure torch); ``eval`` and ``tune`` import the TP runtime, Triton and
the model stack when they are chosen (tests/test_cli.py counts the modules).
"""
import argparse
import sys

DESCRIPTION = """\
Block formats for compressed tensor-parallel communication.

  qformats formats         list every preset (bits per value, compression, max normal, error bound)
  qformats inspect SPEC    explain one format (a preset name or a spec such as fp4_e2m1/b32/e8m0)
  qformats eval            perplexity of a real model when its TP all-reduces are compressed
  qformats tune            per-site policies on the Pareto front of (wire bits, KL)

'qformats COMMAND --help' describes each command's options."""

TUNE_HELP = """\
Per-site communication policies: finds which format each all-reduce of the model should use,
so the sites that hurt the model most get finer formats and the rest coarser ones, for the
fewest wire bits at a given quality. It searches on the same exact emulator as qformats eval,
over site groups (attention output and MLP output x layer 0, layers 1-2, the middle, the last
3), in four stages:

  1. sensitivity: the KL of every (group, candidate format) with only that group compressed,
     on --tokens;
  2. prediction: the exact Pareto front of (mean wire bits, summed KL) over all assignments;
  3. joint: the predicted-best policy under each --budgets bit budget, measured as a whole;
  4. confirm: the measured front's best policy under each --confirm-budgets budget, measured
     again on --confirm-tokens with 95% bootstrap intervals.

Outputs in --out: front.json, front.md, front.png, policies/<name>.json (what
'qformats eval --policy' takes) and each stage's eval folder; a stopped run resumes.

Time on 2 shared CPU cores: the defaults (8 candidates x 8 groups on 1024 tokens, then 16384
tokens of confirmation) take about 38 minutes; a small search,
  qformats tune --candidates mxfp4_h32,nvfp4,mxfp8_e4m3 --tokens 512 --budgets 5,6 \\
      --confirm-budgets 5 --confirm-tokens 2048
takes a few minutes (README gives measured times)."""


def _command(argv) -> str | None:
    """The subcommand named on the command line (the first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv=()) -> argparse.ArgumentParser:
    """The ``qformats`` parser; the options of ``eval`` / ``tune`` are added (and their modules
    imported) only when ``argv`` names that command."""
    parser = argparse.ArgumentParser(prog="qformats", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="{formats,inspect,eval,tune}")
    sub.add_parser("formats", help="list every preset with bits/value, compression, max normal, error bound")
    p = sub.add_parser("inspect", help="explain one format (any spec string or preset name, or an eval format name)")
    p.add_argument("spec")
    p_eval = sub.add_parser("eval", help="perplexity under compressed TP all-reduce (the main job)")
    p_tune = sub.add_parser("tune", help="per-site policies on the Pareto front of (wire bits, KL)")
    cmd = _command(argv)
    if cmd == "eval":
        from .study import eval as eval_job

        eval_job.add_eval_arguments(p_eval)  # its description: eval_job.HELP
    elif cmd == "tune":
        from .study import tune as tune_job

        tune_job.add_tune_arguments(p_tune)
        p_tune.description = TUNE_HELP
    for p in (p_eval, p_tune):
        p.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    if args.cmd == "formats":
        from qformats.describe import format_table

        print(format_table())
    elif args.cmd == "inspect":
        from qformats.describe import explain

        from .study.names import explain_name

        try:
            print(explain_name(args.spec, explain))
        except ValueError as exc:
            print(f"qformats inspect: {exc}", file=sys.stderr)
            return 2
    elif args.cmd == "eval":
        from .study import eval as eval_job

        return eval_job.main_eval(args, argv[argv.index("eval") + 1:]) or 0
    elif args.cmd == "tune":
        from .study import tune as tune_job

        return tune_job.main_tune(args, argv[argv.index("tune") + 1:]) or 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
