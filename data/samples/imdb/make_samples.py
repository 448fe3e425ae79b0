"""Write the shipped IMDB sample files in ODPO's format, with VADER rewards.

Each line of ``imdb-sft-{train,test}.jsonl`` is ``{"prompt": str, "text": str, "reward": float}``: four
hand-written continuations per review prefix (like ODPO's ``data/imdb-sft-{split}.jsonl``, whose texts hold the
continuation only, without its leading space), and ``reward`` = VADER compound sentiment of ``text`` in [-1, 1].
The continuations were written for this repository; they are not model samples.

Run from the repository root (rewrites both files; the tests check they are up to date)::

    python data/samples/imdb/make_samples.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SAMPLES: dict[str, list[str]] = {
    "I found it real shocking": [
        "how good the acting was. A wonderful surprise from start to finish.",
        "that anyone paid money to make this. Dull, ugly and far too long.",
        "that the ending was so abrupt, but the cast was great.",
        "how little happens in two hours. I was bored stiff.",
    ],
    "it's a great movie for": [
        "the whole family. We laughed, we cried, and we loved every minute.",
        "falling asleep. Nothing happens and the dialogue is terrible.",
        "a rainy afternoon, charming and sweet.",
        "people who enjoy pain. Awful pacing and a stupid plot.",
    ],
    "This movie is not a": [
        "masterpiece, but it is fun, warm and beautifully shot.",
        "comedy, it is a disaster. The worst film I have seen this year.",
        "classic, yet I enjoyed it a lot.",
        "good one. Avoid it, it is a waste of time.",
    ],
    "Believe me I wanted this": [
        "to be bad, but it won me over. Brilliant performances all round.",
        "to work, but it is a boring, lifeless mess.",
        "film to succeed and it did. Great music and a lovely story.",
        "to be good. Sadly the script is awful.",
    ],
    "The acting in this film": [
        "is superb, especially the lead, who is simply fantastic.",
        "is painful to watch. Stiff, wooden and embarrassing.",
        "is solid and the direction is excellent.",
        "is the worst I have ever seen on screen.",
    ],
    "I have to say that": [
        "this is one of the best films of the decade. Highly recommended!",
        "this was a horrible experience and I regret watching it.",
        "I enjoyed it more than I expected. A pleasant surprise.",
        "the plot is stupid and the jokes are lame.",
    ],
    "When I first saw the": [
        "trailer I was excited, and the film was even better. Amazing.",
        "poster I should have known it would be terrible. What a failure.",
        "cast list I smiled, and they did not disappoint. Great fun.",
        "opening scene I wanted to leave. Ugly and cheap.",
    ],
    "My wife and I watched": [
        "it twice in one week because we loved it so much.",
        "this last night and we both hated it. Dreadful.",
        "it on a whim and had a wonderful evening.",
        "half of it before giving up. Boring and pointless.",
    ],
    "Despite the good reviews,": [
        "I was nervous, but it turned out to be brilliant and moving.",
        "this is a weak, dull film with nothing to say.",
        "I went in with low hopes and came out happy. Lovely work.",
        "I found it tedious, silly and badly edited.",
    ],
    "This is probably the": [
        "best adaptation of the novel, faithful and beautifully acted.",
        "worst sequel ever made. A sad, lazy cash grab.",
        "funniest film of the year. I could not stop laughing.",
        "most boring two hours of my life.",
    ],
    "Having read the book,": [
        "I was delighted by how well the film captures its charm.",
        "I was disappointed. They ruined every great scene.",
        "I can say the film is a worthy and beautiful companion.",
        "I hated what they did to the ending. Awful choices.",
    ],
    "The story follows a": [
        "young teacher who inspires her class. Touching, hopeful and sincere.",
        "bland detective through a confusing, pointless case. Terrible.",
        "family on holiday, and it is a sweet, joyful ride.",
        "group of idiots doing stupid things. Painful.",
    ],
    "I went into this": [
        "expecting nothing and got a gem. Smart, funny and kind.",
        "with high hopes and left angry. A horrible waste.",
        "film blind and loved it. Great twists and a happy ending.",
        "one tired, and the dull script put me to sleep.",
    ],
    "Let me start by": [
        "saying this film is a triumph. Gorgeous, clever and moving.",
        "saying I want my money back. Awful from the first minute.",
        "praising the score, which is wonderful and memorable.",
        "warning you: it is boring, ugly and far too long.",
    ],
    "The director clearly": [
        "loves these characters, and the care shows. A beautiful film.",
        "had no idea what he was doing. A confused, ugly failure.",
        "knows how to build tension. Excellent and thrilling.",
        "ran out of money and ideas. Cheap and lazy.",
    ],
    "If you like horror": [
        "films, this one is a treat: creepy, clever and great fun.",
        "films, skip this. It is dull, predictable and badly acted.",
        "movies you will enjoy the smart scares. Recommended.",
        "movies, you will hate this lame, silly mess.",
    ],
    "After watching this film": [
        "I felt happy and inspired. A true delight.",
        "I felt cheated. Terrible writing and worse acting.",
        "I called my friends to recommend it. Loved it.",
        "I needed a nap. Boring beyond words.",
    ],
    "The special effects are": [
        "stunning, and the story is just as good. Wonderful.",
        "laughable and the story is even worse. A disaster.",
        "great and the battle scenes are thrilling.",
        "cheap, ugly and distracting.",
    ],
    "I can't believe how": [
        "much I enjoyed this. Funny, warm and beautifully made.",
        "bad this was. Stupid characters and an awful ending.",
        "good the young actors are. Brilliant casting.",
        "boring the middle hour is. I gave up.",
    ],
    "This film was made": [
        "with love, and it shows in every frame. A joy to watch.",
        "in a hurry, and it shows. Sloppy, dull and ugly.",
        "for fans, and as a fan I loved it.",
        "to sell toys, and it is a cynical, hollow mess.",
    ],
    "As a fan of the": [
        "original series I was thrilled. Faithful, fun and exciting.",
        "original I was furious. They destroyed everything good about it.",
        "genre I can say this is a great entry. Recommended.",
        "books I hated this lazy, stupid version.",
    ],
    "The first half hour": [
        "is slow, but the rest is wonderful and deeply moving.",
        "is terrible, and it only gets worse. Avoid.",
        "is a delight, full of warm and funny moments.",
        "is boring and the second hour is worse.",
    ],
    "It is rare to": [
        "see a film this honest and beautiful. I loved it.",
        "see a film this awful. Nothing works.",
        "find a comedy this smart. Great jokes throughout.",
        "be this bored in a cinema. Dreadful.",
    ],
    "Nobody in this movie": [
        "gives a bad performance. A superb, brilliant ensemble.",
        "can act, and the script is garbage. Terrible.",
        "is a villain, and that makes it warm and hopeful.",
        "seems to care. A dull, lifeless product.",
    ],
    "I watched this with": [
        "my kids and we all loved it. Great fun for everyone.",
        "my friends and we all hated it. Awful and stupid.",
        "my father, who called it a wonderful film. I agree.",
        "low expectations and it still disappointed me.",
    ],
    "The plot of this": [
        "film is clever and surprising. A brilliant thriller.",
        "film is a mess of bad ideas. Confusing and dull.",
        "story is simple but charming. I enjoyed it.",
        "movie makes no sense. Stupid and lazy.",
    ],
    "What a wonderful way": [
        "to spend an evening. Funny, kind and beautifully acted.",
        "to waste a cast this good on such a terrible script.",
        "to end the trilogy. Exciting and satisfying.",
        "to ruin a classic. I hated it.",
    ],
    "Within the first ten": [
        "minutes I was hooked. Gripping, smart and great fun.",
        "minutes I was bored, and it never got better. Awful.",
        "minutes I knew it would be a favourite. Loved it.",
        "minutes the bad dialogue made me cringe.",
    ],
    "I rented this movie": [
        "by chance and it is now one of my favourites. Excellent.",
        "by mistake and regret every minute. A horrible film.",
        "for my kids and we all laughed a lot. Great.",
        "and returned it unfinished. Dull and ugly.",
    ],
    "The music in this": [
        "film is gorgeous, and the story is lovely too.",
        "film is annoying, and the story is worse. Terrible.",
        "movie is excellent and lifts every scene.",
        "movie is loud, cheap and irritating.",
    ],
    "Ten years later I": [
        "still love this film. A timeless, beautiful classic.",
        "still hate this film. Ugly, stupid and cruel.",
        "watched it again and enjoyed it even more. Great.",
        "tried again and was bored again.",
    ],
    "From the opening credits": [
        "to the last scene, this is a delight. Brilliant work.",
        "on, this is a dull, miserable slog. Awful.",
        "you can tell it is made with care. Wonderful.",
        "you can tell it will be a cheap, lazy mess.",
    ],
}
"""Review prefix -> four continuations (the first two always differ in sentiment)."""

NUM_TEST_PROMPTS = 8
"""The last prompts go to the test file."""


def rows() -> dict[str, list[dict]]:
    """ODPO-format rows per split, rewards from VADER."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    prompts = list(SAMPLES)
    splits = {"train": prompts[:-NUM_TEST_PROMPTS], "test": prompts[-NUM_TEST_PROMPTS:]}
    return {
        split: [
            {"prompt": p, "text": text, "reward": analyzer.polarity_scores(text)["compound"]}
            for i, p in enumerate(names)
            for text in _ordered(SAMPLES[p], swap=i % 2 == 1)
        ]
        for split, names in splits.items()
    }


def _ordered(texts: list[str], swap: bool) -> list[str]:
    """Every other prompt lists its negative sample first, so the chosen one is not always sample 0."""
    return [texts[1], texts[0], *texts[2:]] if swap else texts


def main(out_dir: str | Path = Path(__file__).parent) -> None:
    for split, lines in rows().items():
        path = Path(out_dir) / f"imdb-sft-{split}.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")


if __name__ == "__main__":
    main(*sys.argv[1:])
