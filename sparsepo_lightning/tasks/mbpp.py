"""MBPP problems for the text-to-code task (docs/method.md §6.5): loading, the prompt, where a sampled solution
ends, and the program run against the tests. Used by the pair builder (``builders.code``) and by
``sparsepo evaluate code``.

**Prompt** (raw text, no chat template, no BOS at training time; see :func:`format_prompt`)::

    \"\"\"
    Write a function to find the shared elements from the given two lists.
    assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)
    \"\"\"

followed by a newline; the model writes the whole solution (imports and ``def``). The first test shows the
expected function name and signature, as in the MBPP paper's prompt.

**Where a sampled solution ends** (:data:`STOP_STRINGS`, :func:`truncate_completion`): generation stops at the
first ``\\nassert ``, ``\\nprint(``, ``\\nif __name__``, a closing or opening docstring at column 0 or a Markdown
fence; the text is then cut at the first top-level line (column 0) that is not part of a definition, once a
``def``/``class`` has been seen. Definitions, decorators, imports, comments and blank lines are kept, so helper
functions and constants around the solution survive; test calls, prints and restarted prompts do not.

**Program run in the sandbox**: ``test_setup_code``, the solution, then each line of ``test_list``
(``challenge_test_list`` is not used). A solution passes when the program runs to the end.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MBPP_HUB_ID = "google-research-datasets/mbpp"
PROMPT_TEMPLATE = '"""\n{text}\n{example}\n"""\n'
"""MBPP prompt: the task text and the first test inside a module docstring, then a newline."""
STOP_STRINGS = ("\nassert ", "\nprint(", "\nif __name__", '\n"""', "\n'''", "\n```")
"""Generation stops once a sample contains one of these (cut again by :func:`truncate_completion`)."""
_DEFINITION = re.compile(r"(async\s+def|def|class)\b|@")
_KEPT_TOP_LEVEL = re.compile(r"(import|from)\s|#")


@dataclass(frozen=True)
class CodeProblem:
    """One MBPP problem (``full`` or ``sanitized`` schema)."""

    task_id: int
    text: str
    """The natural-language task (``text`` in ``full``, ``prompt`` in ``sanitized``)."""
    code: str
    """The reference solution."""
    test_list: tuple[str, ...]
    test_setup_code: str = ""
    """Run before the solution (``test_imports`` joined in ``sanitized``)."""

    @property
    def prompt(self) -> str:
        return format_prompt(self.text, self.test_list)

    def program(self, completion: str) -> str:
        """Setup, solution and tests as one program for the sandbox."""
        return "\n".join([self.test_setup_code, completion, "", *self.test_list, ""])


def format_prompt(text: str, test_list: Sequence[str]) -> str:
    """:data:`PROMPT_TEMPLATE` filled with the task text and the first test."""
    return PROMPT_TEMPLATE.format(text=text.strip(), example=test_list[0].strip() if test_list else "")


def problem_from_row(value: dict[str, Any]) -> CodeProblem:
    """A :class:`CodeProblem` from a row of MBPP ``full`` or ``sanitized`` (told apart by ``text``/``prompt``)."""
    if "text" in value:
        text, setup = value["text"], value.get("test_setup_code") or ""
    elif "prompt" in value:
        text, setup = value["prompt"], "\n".join(value.get("test_imports") or [])
    else:
        raise ValueError(f"not an MBPP row (no 'text' or 'prompt' field; keys {sorted(value)}).")
    return CodeProblem(int(value["task_id"]), text, value["code"], tuple(value["test_list"]), setup)


def load_mbpp(
    source: str = MBPP_HUB_ID, config: str | None = "full", split: str = "train", **hub_kwargs: Any
) -> list[CodeProblem]:
    """MBPP problems from the hub, a local folder in the hub's layout, or one ``.jsonl``/``.json``/``.parquet`` file.

    Args:
        source: hub id, local folder (both read by ``load_hub_split``) or a file (read by ``iter_file``).
        config: ``full`` or ``sanitized`` (ignored for a file).
        split: ``train``, ``test``, ``validation`` or ``prompt`` (ignored for a file).
        **hub_kwargs: passed on to ``datasets.load_dataset``.
    """
    # here, not at the top: `sparsepo evaluate code --help` shows MBPP_HUB_ID without importing the data pipeline
    from sparsepo_lightning.data.readers import iter_file, load_hub_split

    if Path(source).is_file():
        rows: Iterable[Any] = (row.value for row in iter_file(source))
    else:
        rows = load_hub_split(source, config, split, **hub_kwargs)
    return [problem_from_row(dict(row)) for row in rows]


def truncate_completion(text: str) -> str:
    """Cut a sampled solution at its first top-level non-definition line after a definition (module docstring).

    Before any ``def``/``class``, only the lines that start a stop string (``assert``, ``print(``,
    ``if __name__``, docstring quotes, Markdown fences) end the solution; constants and imports are kept.
    """
    lines, seen_definition = [], False
    for line in text.split("\n"):
        if line and not line[0].isspace():
            if _DEFINITION.match(line):
                seen_definition = True
            elif _KEPT_TOP_LEVEL.match(line):
                pass
            elif seen_definition or any(("\n" + line).startswith(s) for s in STOP_STRINGS):
                break
        lines.append(line)
    return "\n".join(lines).rstrip() + "\n"


