"""Task loaders: one module per dataset, each a ``PreferenceDataModule`` subclass whose ``convert_rows`` maps the
dataset's own rows to pairs (the common base and the whole pipeline are in ``sparsepo_lightning.data``).

``hh`` (Anthropic HH), ``tldr`` (TL;DR summarisation), ``imdb`` (ODPO's IMDB files and builder pairs) and
``imdb_prompts`` (the sentiment builder's review prefixes), ``code`` (MBPP code pairs) and ``mbpp`` (the problems,
prompts and test programs shared by the code builder and ``sparsepo evaluate code``).
"""
