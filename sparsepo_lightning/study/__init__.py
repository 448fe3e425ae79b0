"""Controlled studies: the same data, order, steps and initial policy for every method; only the objective and the
token weighting change. ``sparsepo study sentiment run|report`` (also ``make study``).

- ``plan``: the study's settings, its methods and the resolved training config of every run (keyed by a hash);
- ``driver``: builds the data, trains, evaluates and keeps the small per-run logs; resumable;
- ``maskdump``: a callback that writes the final masks of the held-out pairs, token by token;
- ``stats``: frontier areas, paired bootstrap intervals, Spearman correlation with a permutation p-value;
- ``logs``: the per-run logs as the report reads them (``load_runs``);
- ``figures``: the report's PNG figures (frontier, sparsity over training, token heat-maps);
- ``report``: the report (Markdown + the figures) generated from the per-run logs only.
"""
