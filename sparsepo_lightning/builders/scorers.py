"""Scorers for sentiment pairs and evaluation: map texts to scores, higher = more preferred (more positive).

``make_scorer("vader")`` is the offline default (VADER lexicon), ``"textblob"`` a second offline lexicon scorer;
any other name or path is a sequence
classifier scored as P(positive) (docs/method.md §6.2).
"""

from __future__ import annotations

from typing import Protocol

import torch


class Scorer(Protocol):
    """Maps continuation texts to scores; higher means more preferred (more positive)."""

    def __call__(self, texts: list[str]) -> list[float]: ...


class VaderScorer:
    """VADER compound sentiment score of each text, in [-1, 1] (vaderSentiment, MIT license)."""

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, texts: list[str]) -> list[float]:
        return [float(self._analyzer.polarity_scores(text)["compound"]) for text in texts]


class TextBlobScorer:
    """TextBlob's pattern-lexicon polarity of each text, in [-1, 1] (``textblob``, MIT license; no corpus download).

    A second offline scorer built differently from VADER (adjective lexicon with intensifiers and negation from the
    Pattern library, no valence-shifting rules for punctuation or capitals): the sentiment study reports whether
    its conclusion holds under both.
    """

    def __init__(self) -> None:
        try:
            from textblob.en.sentiments import PatternAnalyzer
        except ImportError as e:
            raise ImportError("the textblob scorer needs the `textblob` package: pip install -e '.[study]'") from e
        self._analyzer = PatternAnalyzer()

    def __call__(self, texts: list[str]) -> list[float]:
        return [float(self._analyzer.analyze(text).polarity) for text in texts]


_POSITIVE_NAMES = ("positive", "pos")


class ClassifierScorer:
    """Probability of the positive class under a sequence classifier (``AutoModelForSequenceClassification``).

    E.g. ``lvwerra/distilbert-imdb`` (ODPO's scorer) or ``siebert/sentiment-roberta-large-english``
    (docs/method.md §6.2). Each text is scored alone (the continuation, not the prompt), truncated to
    `max_length` tokens; softmax is taken in float32.

    Args:
        model_name: hub name or local folder of the classifier.
        positive_label: the positive class, as a label name of ``config.id2label`` or an index; ``None`` finds
            it from the names (``POSITIVE``/``pos``, case-insensitive, or ``LABEL_1`` of a two-class model).
        batch_size: texts per forward pass.
        device: torch device, e.g. ``cpu`` or ``cuda``.
        max_length: texts are truncated to this many tokens.
    """

    def __init__(
        self,
        model_name: str,
        positive_label: str | int | None = None,
        batch_size: int = 32,
        device: str = "cpu",
        max_length: int = 512,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"ClassifierScorer batch_size={batch_size}: must be at least 1.")
        self.tokenizer = AutoTokenizer.from_pretrained(model_name)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_name).to(device).eval()
        if self.tokenizer.pad_token is None:  # GPT-style classifiers: pad with EOS (attention_mask hides it)
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.positive_index = positive_index(self.model.config.id2label, positive_label, model_name)
        self.batch_size, self.max_length = batch_size, max_length

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.model.device)
            logits = self.model(**batch).logits.float()  # (batch, num_labels)
            scores += logits.softmax(dim=-1)[:, self.positive_index].tolist()
        return scores


def positive_index(id2label: dict[int, str], positive_label: str | int | None, model_name: str = "") -> int:
    """Index of the positive class in a classifier's ``id2label``.

    Raises:
        ValueError: the label is not found, or cannot be guessed from the names.
    """
    labels = {int(i): str(name) for i, name in id2label.items()}
    fix = f"pass positive_label (--scorer-positive-label) as one of {labels}"
    if isinstance(positive_label, int):
        if positive_label not in labels:
            raise ValueError(f"{model_name}: positive_label={positive_label} is not a class index; {fix}.")
        return positive_label
    if positive_label is not None:
        matches = [i for i, name in labels.items() if name.lower() == positive_label.lower()]
        if not matches:
            raise ValueError(f"{model_name}: positive_label={positive_label!r} is not a label name; {fix}.")
        return matches[0]
    matches = [i for i, name in labels.items() if name.lower() in _POSITIVE_NAMES]
    if len(matches) == 1:
        return matches[0]
    if sorted(name.upper() for name in labels.values()) == ["LABEL_0", "LABEL_1"]:
        return next(i for i, name in labels.items() if name.upper() == "LABEL_1")
    raise ValueError(f"{model_name}: cannot tell which class is positive from the labels {labels}; {fix}.")


def make_scorer(
    spec: str, positive_label: str | int | None = None, batch_size: int = 32, device: str = "cpu"
) -> Scorer:
    """``"vader"`` gives a `VaderScorer`, ``"textblob"`` a `TextBlobScorer`; any other string is a classifier name or
    path for `ClassifierScorer`."""
    if spec.lower() == "vader":
        return VaderScorer()
    if spec.lower() == "textblob":
        return TextBlobScorer()
    return ClassifierScorer(spec, positive_label=positive_label, batch_size=batch_size, device=device)
