"""Offline pair builders and scorers: the code here runs models (sampling continuations, sentiment classifiers) and
the sandbox, unlike the data pipeline in ``sparsepo_lightning.data``.

``sentiment`` (IMDB sentiment pairs: ``python -m sparsepo_lightning.builders.sentiment``), ``code`` (MBPP pairs
verified in the sandbox: ``python -m sparsepo_lightning.builders.code``), ``continuations`` (seeded sampling shared
by both), ``scorers`` (sentiment scorers, also used by ``sparsepo evaluate``), ``jsonl`` (their resumable output).
"""
