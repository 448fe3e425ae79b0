"""Write ``prompts.txt``: review openings whose next words are an evaluation of the film.

Every opening ends where a reviewer states a judgement ("The acting in this thriller was"), so that a short
continuation carries the sentiment that VADER scores, and a policy can learn it from a few hundred pairs. 48
templates written for this project, each filled with 12 subjects: 576 distinct prompts, in template order.

    python data/quickstart/make_prompts.py          # rewrites data/quickstart/prompts.txt
"""

from __future__ import annotations

from pathlib import Path

SUBJECTS = ("film", "movie", "sequel", "thriller", "comedy", "documentary", "horror movie", "drama", "remake",
            "musical", "western", "cartoon")
TEMPLATES = (
    "The acting in this {s} was", "Overall, this {s} was", "The ending of this {s} was", "The plot of this {s} was",
    "The dialogue in this {s} was", "The soundtrack of this {s} was", "The pacing of this {s} was",
    "The special effects in this {s} were", "The characters in this {s} were", "The script of this {s} was",
    "The cast of this {s} was", "The story of this {s} was", "The director of this {s} did a", "Honestly, this {s} is",
    "In one word, this {s} is", "I would describe this {s} as", "My opinion of this {s}: it is",
    "Watching this {s} made me feel", "After this {s}, I felt", "I found this {s} to be", "To me this {s} was",
    "The lead actor in this {s} was", "The villain in this {s} was", "The humor in this {s} was",
    "The camera work in this {s} was", "The music in this {s} was", "The first half of this {s} was",
    "The second half of this {s} was", "The final scene of this {s} was", "The performances in this {s} were",
    "The writing in this {s} was", "The costumes in this {s} were", "The set design of this {s} was",
    "My friends said this {s} was", "The critics called this {s}", "I rate this {s} as",
    "Compared to others, this {s} is", "For the price of a ticket, this {s} was", "As a fan, I found this {s}",
    "The twist in this {s} was", "The romance in this {s} was", "The action scenes in this {s} were",
    "The editing of this {s} was", "The tone of this {s} was", "Every minute of this {s} was",
    "My kids thought this {s} was", "The trailer made this {s} look", "Looking back, this {s} was",
)


def prompts() -> list[str]:
    return [template.format(s=subject) for template in TEMPLATES for subject in SUBJECTS]


if __name__ == "__main__":
    out = Path(__file__).with_name("prompts.txt")
    items = prompts()
    assert len(items) == len(set(items)) == len(TEMPLATES) * len(SUBJECTS)
    out.write_text("\n".join(items) + "\n", encoding="utf-8")
    print(f"wrote {len(items)} prompts to {out}")
