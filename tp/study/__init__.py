"""tp.study: the study wing: TP emulation on any Hugging Face model (``tp.study.hf``), the
``qformats eval`` and ``qformats tune`` jobs, and the pinned assets they run on.

One job per module, and what the jobs share in modules of their own:

- ``eval``: the ``qformats eval`` job (``run_eval``, its command line); ``tune``: the
  ``qformats tune`` job (``run_tune``, one function per stage, its command line);
- ``args``: arguments checked before anything loads (format names, policy files, eval's plan);
- ``windows``: the text cut into scored windows; ``stats``: window scores, metrics, paired
  bootstrap intervals, verdicts, Pareto fronts;
- ``store``: a run's folder (``progress.jsonl`` and resuming, the lock, the code's digest);
- ``report``: eval's table, results.json / .csv and plot; ``front``: tune's front.md, front.png
  and ``reprice``; ``search``: tune's site groups and additive front;
- ``costs``: modelled all-reduce time (``--gpu/--link``); ``hf``, ``assets``, ``names``.
"""
