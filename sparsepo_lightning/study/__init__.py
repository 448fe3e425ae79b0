"""Controlled studies: the same data, order, steps and initial policy for every arm; only the objective and the
token weighting change. ``sparsepo study sentiment run|report|plan --plan configs/study/<plan>.yaml`` (also
``make study PLAN=...``; docs/studies.md).

- ``planfile``: a study plan as a YAML file (arms, controls, β values, seeds, evaluations, scorers, comparisons);
- ``plan``: the study's settings, the runs of a plan and the resolved training config of every run (keyed by a hash);
- ``driver``: builds the data, trains, evaluates each run at the plan's checkpoints and keeps the small per-run logs;
  resumable;
- ``checkpoints``, ``maskdump``: callbacks that save the evaluated checkpoints and write the final masks of the
  held-out pairs, token by token;
- ``stats``: Pareto fronts, frontier areas, the prompt bootstrap of the first study, Spearman with permutations;
- ``inference``: the plan statistics: hierarchical bootstrap, fixed KL range, Holm, resolution, run-level regression;
- ``verdicts``: the report sections of a plan's comparisons (verdicts, tables, regression, mask diagnostics);
- ``logs``: the per-run logs as the report reads them (``load_runs``);
- ``figures``: the report's PNG figures (frontier, sparsity over training, token heat-maps);
- ``report``: the report (Markdown + the figures) generated from the per-run logs only.
"""
