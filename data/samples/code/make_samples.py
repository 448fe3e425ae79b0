"""Write the shipped text-to-code sample: hand-written problems, solutions, their sandbox results, and pairs.

Run from the repository root: ``python data/samples/code/make_samples.py``. Every problem and solution is
written by hand in MBPP's style (nothing is copied from MBPP or HumanEval); whether a solution passes is decided
by running it in the sandbox, and the script checks that this matches the label given here.
"""

from __future__ import annotations

import json
from pathlib import Path

from sparsepo_lightning.builders.code import make_pairs
from sparsepo_lightning.sandbox import SandboxConfig, run_programs
from sparsepo_lightning.tasks.mbpp import CodeProblem

HERE = Path(__file__).parent
PAIR_SEED = 42

# (task_id, text, tests, passing solutions, failing solutions)
TRAIN = [
    (9001, "Write a function to return the largest of three numbers.",
     ["assert max_of_three(1, 2, 3) == 3", "assert max_of_three(5, -1, 2) == 5", "assert max_of_three(0, 7, 7) == 7"],
     ["def max_of_three(a, b, c):\n    return max(a, b, c)\n",
      "def max_of_three(a, b, c):\n    return sorted([a, b, c])[-1]\n",
      "def max_of_three(a, b, c):\n    best = a\n    if b > best:\n        best = b\n"
      "    if c > best:\n        best = c\n    return best\n"],
     ["def max_of_three(a, b, c):\n    return max(a, b)\n",
      "def max_of_three(a, b, c):\n    return sorted([a, b, c])[0]\n"]),
    (9002, "Write a function to count how many times a character occurs in a string.",
     ["assert count_char('banana', 'a') == 3", "assert count_char('apple', 'z') == 0",
      "assert count_char('aaaa', 'a') == 4"],
     ["def count_char(s, ch):\n    return s.count(ch)\n",
      "def count_char(s, ch):\n    return sum(1 for c in s if c == ch)\n",
      "def count_char(s, ch):\n    n = 0\n    for c in s:\n        if c == ch:\n            n += 1\n    return n\n"],
     ["def count_char(s, ch):\n    return s.find(ch)\n",
      "def count_char(s, ch):\n    return len(s.split(ch))\n"]),
    (9003, "Write a function to return a list with every element of the given list doubled.",
     ["assert double_all([1, 2, 3]) == [2, 4, 6]", "assert double_all([]) == []", "assert double_all([-2]) == [-4]"],
     ["def double_all(xs):\n    return [2 * x for x in xs]\n",
      "def double_all(xs):\n    return list(map(lambda x: x * 2, xs))\n",
      "def double_all(xs):\n    out = []\n    for x in xs:\n        out.append(x + x)\n    return out\n"],
     ["def double_all(xs):\n    return [x * x for x in xs]\n",
      "def double_all(xs):\n    return xs * 2\n"]),
    (9004, "Write a function to check whether a non-empty string starts and ends with the same character.",
     ["assert same_ends('level') == True", "assert same_ends('abc') == False", "assert same_ends('a') == True"],
     ["def same_ends(s):\n    return s[0] == s[-1]\n",
      "def same_ends(s):\n    return s.startswith(s[-1])\n",
      "def same_ends(s):\n    first, last = s[0], s[len(s) - 1]\n    return first == last\n"],
     ["def same_ends(s):\n    return s[0] == s[1]\n",
      "def same_ends(s):\n    return s[0] == s[-2]\n"]),
    (9005, "Write a function to compute the factorial of a non-negative integer.",
     ["assert factorial_of(0) == 1", "assert factorial_of(1) == 1", "assert factorial_of(5) == 120"],
     ["import math\n\n\ndef factorial_of(n):\n    return math.prod(range(1, n + 1))\n",
      "def factorial_of(n):\n    if n == 0:\n        return 1\n    return n * factorial_of(n - 1)\n",
      "def factorial_of(n):\n    result = 1\n    for k in range(2, n + 1):\n        result *= k\n    return result\n"],
     ["import math\n\n\ndef factorial_of(n):\n    return math.prod(range(n))\n",
      "def factorial_of(n):\n    return n * factorial_of(n - 1) if n > 1 else n\n"]),
    (9006, "Write a function to remove all spaces from a string.",
     ["assert remove_spaces('a b c') == 'abc'", "assert remove_spaces(' hi ') == 'hi'",
      "assert remove_spaces('x  y') == 'xy'"],
     ["def remove_spaces(s):\n    return s.replace(' ', '')\n",
      "def remove_spaces(s):\n    return ''.join(s.split(' '))\n",
      "def remove_spaces(s):\n    return ''.join(c for c in s if c != ' ')\n"],
     ["def remove_spaces(s):\n    return s.strip()\n",
      "def remove_spaces(s):\n    return s.replace(' ', '', 1)\n"]),
    (9007, "Write a function to return the sum of the even numbers in a list.",
     ["assert sum_even([1, 2, 3, 4]) == 6", "assert sum_even([1, 3]) == 0", "assert sum_even([-2, 5, 8]) == 6"],
     ["def sum_even(xs):\n    return sum(x for x in xs if x % 2 == 0)\n",
      "def sum_even(xs):\n    total = 0\n    for x in xs:\n        if x % 2 == 0:\n"
      "            total += x\n    return total\n",
      "def sum_even(xs):\n    return sum(filter(lambda x: x % 2 == 0, xs))\n",
      "def sum_even(xs):\n    return sum([x for x in xs if not x & 1])\n"],
     ["def sum_even(xs):\n    return sum(xs[::2])\n",
      "def sum_even(xs):\n    return sum(x for x in xs if x % 2)\n"]),
    (9008, "Write a function to convert a list of decimal digits into the integer they spell.",
     ["assert digits_to_int([1, 2, 3]) == 123", "assert digits_to_int([0, 5]) == 5", "assert digits_to_int([9]) == 9"],
     ["def digits_to_int(digits):\n    return int(''.join(map(str, digits)))\n",
      "def digits_to_int(digits):\n    n = 0\n    for d in digits:\n        n = n * 10 + d\n    return n\n",
      "from functools import reduce\n\n\ndef digits_to_int(digits):\n"
      "    return reduce(lambda n, d: 10 * n + d, digits, 0)\n",
      "def digits_to_int(digits):\n    return sum(d * 10**i for i, d in enumerate(reversed(digits)))\n"],
     ["def digits_to_int(digits):\n    return sum(digits)\n",
      "def digits_to_int(digits):\n    return int(''.join(map(str, reversed(digits))))\n"]),
    (9009, "Write a function to find the index of the first negative number in a list, or -1 if there is none.",
     ["assert first_negative([3, -1, -5]) == 1", "assert first_negative([1, 2]) == -1",
      "assert first_negative([-4, 2]) == 0"],
     ["def first_negative(xs):\n    for i, x in enumerate(xs):\n        if x < 0:\n            return i\n"
      "    return -1\n",
      "def first_negative(xs):\n    return next((i for i, x in enumerate(xs) if x < 0), -1)\n",
      "def first_negative(xs):\n    i = 0\n    while i < len(xs):\n        if xs[i] < 0:\n"
      "            return i\n        i += 1\n    return -1\n",
      "def first_negative(xs):\n    found = [i for i, x in enumerate(xs) if x < 0]\n"
      "    return found[0] if found else -1\n"],
     ["def first_negative(xs):\n    return xs.index(min(xs))\n",
      "def first_negative(xs):\n    for x in xs:\n        if x < 0:\n            return x\n    return -1\n"]),
]
VAL = [
    (9010, "Write a function to return the number of words in a sentence.",
     ["assert count_words('the quick fox') == 3", "assert count_words('one') == 1",
      "assert count_words('a  b') == 2"],
     ["def count_words(s):\n    return len(s.split())\n",
      "def count_words(s):\n    return sum(1 for _ in s.split())\n"],
     ["def count_words(s):\n    return s.count(' ')\n",
      "def count_words(s):\n    return len(s.split(' '))\n"]),
    (9011, "Write a function to check whether all elements of a list are distinct.",
     ["assert all_distinct([1, 2, 3]) == True", "assert all_distinct([1, 2, 1]) == False",
      "assert all_distinct([3, 1]) == True"],
     ["def all_distinct(xs):\n    return len(set(xs)) == len(xs)\n",
      "def all_distinct(xs):\n    seen = set()\n    for x in xs:\n        if x in seen:\n            return False\n"
      "        seen.add(x)\n    return True\n"],
     ["def all_distinct(xs):\n    return xs == sorted(xs)\n",
      "def all_distinct(xs):\n    return len(set(xs)) > 1\n"]),
    (9012, "Write a function to return the last digit of a non-negative integer.",
     ["assert last_digit(123) == 3", "assert last_digit(7) == 7", "assert last_digit(40) == 0"],
     ["def last_digit(n):\n    return n % 10\n",
      "def last_digit(n):\n    return int(str(n)[-1])\n"],
     ["def last_digit(n):\n    return n // 10\n",
      "def last_digit(n):\n    return int(str(n)[0])\n"]),
]


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def build(split: str, spec: list, mode: str) -> None:
    problems, samples, expected = [], [], []
    for task_id, text, tests, passing, failing in spec:
        problem = CodeProblem(task_id, text, passing[0], tuple(tests))
        problems.append({"task_id": task_id, "text": text, "code": passing[0], "test_list": tests,
                         "test_setup_code": "", "challenge_test_list": []})  # fmt: skip
        for i, completion in enumerate(passing + failing):
            samples.append({"task_id": task_id, "sample": i, "origin": "handwritten", "prompt": problem.prompt,
                            "completion": completion})  # fmt: skip
            expected.append((problem.program(completion), i < len(passing)))
    results = run_programs([program for program, _ in expected], SandboxConfig(timeout=10.0), progress=False)
    for row, (_, should_pass), result in zip(samples, expected, results, strict=True):
        if result.passed != should_pass:
            raise SystemExit(f"task {row['task_id']} sample {row['sample']}: expected passed={should_pass}, "
                             f"got {result.status}\n{result.stderr}")  # fmt: skip
        row["passed"], row["status"] = result.passed, result.status
    pairs, report = make_pairs(samples, mode=mode, seed=PAIR_SEED)
    _write(HERE / f"problems-{split}.jsonl", problems)
    _write(HERE / f"samples-{split}.jsonl", samples)
    _write(HERE / f"{split}.jsonl", pairs)
    print(f"{split}: {report.summary()}")


if __name__ == "__main__":
    build("train", TRAIN, "all")
    build("val", VAL, "one")
