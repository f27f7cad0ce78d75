"""PII gate for training data: find personal data with Microsoft Presidio and replace it in place.

Trajectories, user demos and imported traces are scrubbed before they are stored as training data.
Detection is Presidio's own recognizers (``presidio-analyzer``), replacement is Presidio's anonymizer
(``presidio-anonymizer``) with its ``replace`` operator, which writes a typed placeholder such as
``<EMAIL_ADDRESS>`` over each found span.

Entity types
------------
Always active (pattern / checksum recognizers, no model needed, fully offline):

* ``EMAIL_ADDRESS`` - ``EmailRecognizer``; the domain is validated against tldextract's *bundled*
  public-suffix snapshot (the stock recognizer would try to download the list over the network).
* ``PHONE_NUMBER``  - ``PhoneRecognizer`` (Google's ``phonenumbers``; numbers must be valid for one of
  the recognizer's default regions US, GB, DE, FR, IL, IN, CA, BR).
* ``CREDIT_CARD``   - ``CreditCardRecognizer`` (Luhn-checked).
* ``IP_ADDRESS``    - ``IpRecognizer`` (IPv4 and IPv6).
* ``IBAN_CODE``     - ``IbanRecognizer`` (checksum-validated).

``PERSON`` (names) needs a spaCy NER model. It is active only when one is importable offline:
an installed ``en_core_web_lg`` / ``_md`` / ``_sm`` / ``_trf`` package, or a model named by
``spacy_model=`` (an installed package name or a directory saved with ``nlp.to_disk``), or by the
``DPO_PII_SPACY_MODEL`` environment variable. Models are never downloaded. Without a model the
analyzer runs on Presidio's ``NoOpNlpEngine`` and names are NOT detected; ``ENTITY_TYPES`` and
``PiiScrubber.entity_types`` say which types are active. Asking for ``PERSON`` explicitly without a
model raises, so a blocking check can never silently pass on a type nothing looks for.

Scores and thresholds
---------------------
Validated hits (Luhn, IBAN checksum, email TLD) score 1.0; IP addresses 0.6; phone numbers 0.4
(Presidio's fixed score after ``phonenumbers`` has already validated the number; with a spaCy model,
context words such as "call" or "phone" raise it). The defaults keep ``>= 0.5`` except
``PHONE_NUMBER >= 0.4``. Typical MiniWoB strings (``click button "Submit"``, ``type textbox "4"``,
``Enter 03/15/2016``, ``Select 5:30 PM``) are left alone. Known over-matches: a dotted quad such as a
version string ``1.2.3.4`` is an IP address; a bare 10-digit number is usually a valid US/IN/BR number
and so a phone number; about 1% of random 7-9 digit numbers are valid somewhere in the default regions.
Phone hits with fewer than ``min_phone_digits`` (7) digits are dropped: ``phonenumbers`` accepts some
4-6 digit German short numbers, which MiniWoB inputs such as ``type textbox "16937"`` would trip.

Usage
-----
>>> scrubber = PiiScrubber()                      # build once: Presidio is slow to import
>>> clean, counts = scrubber.scrub_records(records)  # new objects; inputs are not mutated
>>> assert not surviving(clean, scrubber=scrubber)    # the blocking check

Every distinct string is analysed once per scrubber (memoized), so repeated prompts/actions in
rollouts cost one dictionary lookup.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

__all__ = [
    "DEFAULT_THRESHOLDS",
    "ENTITY_TYPES",
    "PATTERN_ENTITY_TYPES",
    "SPACY_MODEL_CANDIDATES",
    "PiiScrubber",
    "counts_metadata",
    "default_scrubber",
    "find_spacy_model",
    "placeholder",
    "scrub_records",
    "surviving",
]

#: Types found by pattern/checksum recognizers; always available offline.
PATTERN_ENTITY_TYPES: tuple[str, ...] = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IP_ADDRESS", "IBAN_CODE")
#: Installed spaCy packages tried, best first, when ``spacy_model="auto"``.
SPACY_MODEL_CANDIDATES: tuple[str, ...] = ("en_core_web_lg", "en_core_web_md", "en_core_web_sm", "en_core_web_trf")
SPACY_MODEL_ENV = "DPO_PII_SPACY_MODEL"
#: Minimum Presidio score per entity type; ``"DEFAULT"`` applies to types not listed.
DEFAULT_THRESHOLDS: Mapping[str, float] = {"DEFAULT": 0.5, "PHONE_NUMBER": 0.4}


def find_spacy_model() -> str | None:
    """The spaCy model to use for PERSON, or None: ``$DPO_PII_SPACY_MODEL`` if set, else the first installed candidate.

    Checks with ``importlib.util.find_spec`` so that spaCy itself is not imported here.
    """
    env = os.environ.get(SPACY_MODEL_ENV, "").strip()
    if env:
        return env if _model_available(env) else None
    for name in SPACY_MODEL_CANDIDATES:
        if importlib.util.find_spec(name) is not None:
            return name
    return None


def _model_available(name: str) -> bool:
    if Path(name).is_dir():
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


#: Entity types active by default on this machine (PERSON only where a spaCy model is installed).
ENTITY_TYPES: tuple[str, ...] = PATTERN_ENTITY_TYPES + (("PERSON",) if find_spacy_model() else ())


def placeholder(entity_type: str) -> str:
    """The text written in place of an entity: Presidio's ``replace`` default, ``<ENTITY_TYPE>``."""
    return f"<{entity_type}>"


class PiiScrubber:
    """Presidio analyzer + anonymizer, built once and reused; memoizes each distinct string.

    :param entity_types: types to find and replace; default: every active type (``ENTITY_TYPES``).
    :param spacy_model: ``"auto"`` (installed model if any), a package name or model directory,
        or None/False for pattern recognizers only. A named model that is not installed raises
        (Presidio would otherwise try to download it).
    :param thresholds: minimum score per type, ``"DEFAULT"`` for the rest (see ``DEFAULT_THRESHOLDS``).
    :param min_phone_digits: phone hits with fewer digits are dropped (``phonenumbers`` accepts some
        4-6 digit German short/pager numbers, which MiniWoB inputs like ``"16937"`` would trip).
    :param cache_size: how many distinct strings to memoize (LRU).
    """

    def __init__(
        self,
        entity_types: Iterable[str] | None = None,
        *,
        spacy_model: str | bool | None = "auto",
        thresholds: Mapping[str, float] | None = None,
        language: str = "en",
        min_phone_digits: int = 7,
        cache_size: int = 200_000,
    ):
        if spacy_model == "auto":
            model = find_spacy_model()
        elif spacy_model in (None, False):
            model = None
        else:
            model = str(spacy_model)
            if not _model_available(model):
                raise ValueError(f"spaCy model {model!r} is neither an installed package nor a directory; it is not downloaded")
        self.spacy_model: str | None = model
        available = PATTERN_ENTITY_TYPES + (("PERSON",) if model else ())
        wanted = tuple(dict.fromkeys(entity_types)) if entity_types is not None else available
        missing = [t for t in wanted if t not in available]
        if missing:
            hint = " (PERSON needs a spaCy NER model: install one or pass spacy_model=)" if "PERSON" in missing else ""
            raise ValueError(f"entity types {missing} cannot be detected here; available: {list(available)}{hint}")
        if not wanted:
            raise ValueError("entity_types is empty")
        self.entity_types: tuple[str, ...] = wanted
        self.language = language
        self.min_phone_digits = int(min_phone_digits)
        self.thresholds = dict(DEFAULT_THRESHOLDS)
        self.thresholds.update(thresholds or {})
        for key, value in self.thresholds.items():
            if not 0.0 < float(value) <= 1.0:
                raise ValueError(f"threshold for {key} must be in (0, 1], got {value}")

        self._analyzer = self._build_analyzer()
        from presidio_anonymizer import AnonymizerEngine
        from presidio_anonymizer.entities import OperatorConfig

        self._anonymizer = AnonymizerEngine()
        self._operators = {"DEFAULT": OperatorConfig("replace")}  # -> "<ENTITY_TYPE>"
        # Placeholders written by this module are never PII (matters for NER models, which may tag "<PERSON>").
        self._allow_list = [w for t in self.entity_types for w in (placeholder(t), t)]
        self._scrub_cached = functools.lru_cache(maxsize=cache_size)(self._scrub_uncached)
        self._scan_cached = functools.lru_cache(maxsize=cache_size)(self._scan_uncached)

    # -- construction -------------------------------------------------------------------------
    def _build_analyzer(self):
        from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
        from presidio_analyzer.predefined_recognizers import (
            CreditCardRecognizer,
            EmailRecognizer,
            IbanRecognizer,
            IpRecognizer,
            PhoneRecognizer,
        )

        class OfflineEmailRecognizer(EmailRecognizer):
            """Presidio's EmailRecognizer, validating TLDs with tldextract's bundled suffix list (no network)."""

            _extract = None

            def validate_result(self, pattern_text: str):
                if OfflineEmailRecognizer._extract is None:
                    import tldextract

                    OfflineEmailRecognizer._extract = tldextract.TLDExtract(cache_dir=None, suffix_list_urls=())
                return OfflineEmailRecognizer._extract(pattern_text).fqdn != ""

        lang = self.language
        by_type = {
            "EMAIL_ADDRESS": lambda: OfflineEmailRecognizer(supported_language=lang),
            "PHONE_NUMBER": lambda: PhoneRecognizer(supported_language=lang),
            "CREDIT_CARD": lambda: CreditCardRecognizer(supported_language=lang),
            "IP_ADDRESS": lambda: IpRecognizer(supported_language=lang),
            "IBAN_CODE": lambda: IbanRecognizer(supported_language=lang),
        }
        recognizers = [by_type[t]() for t in self.entity_types if t in by_type]
        if self.spacy_model:
            from presidio_analyzer.nlp_engine import SpacyNlpEngine
            from presidio_analyzer.predefined_recognizers import SpacyRecognizer

            nlp_engine = SpacyNlpEngine(models=[{"lang_code": lang, "model_name": self.spacy_model}])
            if "PERSON" in self.entity_types:
                recognizers.append(SpacyRecognizer(supported_language=lang, supported_entities=["PERSON"]))
        else:
            from presidio_analyzer.nlp_engine import NoOpNlpEngine

            nlp_engine = NoOpNlpEngine(models=[{"lang_code": lang, "model_name": "none"}])
        registry = RecognizerRegistry(recognizers=recognizers, supported_languages=[lang])
        return AnalyzerEngine(registry=registry, nlp_engine=nlp_engine, supported_languages=[lang])

    # -- strings --------------------------------------------------------------------------------
    def _analyze(self, text: str, entity_types: Sequence[str]):
        results = self._analyzer.analyze(
            text=text,
            language=self.language,
            entities=list(entity_types),
            score_threshold=0.0,  # thresholds are applied per type below
            allow_list=self._allow_list,
            allow_list_match="exact",
        )
        default = self.thresholds["DEFAULT"]
        return [
            r
            for r in results
            if r.score >= self.thresholds.get(r.entity_type, default)
            and (r.entity_type != "PHONE_NUMBER" or sum(c.isdigit() for c in text[r.start : r.end]) >= self.min_phone_digits)
        ]

    def _scrub_uncached(self, text: str) -> tuple[str, tuple[tuple[str, int], ...]]:
        results = self._analyze(text, self.entity_types)
        if not results:
            return text, ()
        out = self._anonymizer.anonymize(text=text, analyzer_results=results, operators=self._operators)
        counts = Counter(item.entity_type for item in out.items)
        return out.text, tuple(sorted(counts.items()))

    def _scan_uncached(self, text: str, entity_types: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
        results = self._analyze(text, entity_types)
        if not results:
            return ()
        # Same conflict resolution as scrubbing (overlaps merged, best score wins), nothing kept.
        out = self._anonymizer.anonymize(text=text, analyzer_results=results, operators=self._operators)
        return tuple(sorted(Counter(item.entity_type for item in out.items).items()))

    def scrub_text(self, text: str) -> tuple[str, Counter]:
        """Replace every found entity in ``text`` with ``<ENTITY_TYPE>``; returns (new text, counts per type)."""
        if not isinstance(text, str):
            raise TypeError(f"scrub_text wants a str, got {type(text).__name__}")
        if not text.strip():
            return text, Counter()
        new, counts = self._scrub_cached(text)
        return new, Counter(dict(counts))

    def scan_text(self, text: str, entity_types: Iterable[str] | None = None) -> Counter:
        """Count entities in ``text`` without changing it (``entity_types`` default: this scrubber's)."""
        types = self._check_types(entity_types)
        if not text.strip():
            return Counter()
        return Counter(dict(self._scan_cached(text, types)))

    def _check_types(self, entity_types: Iterable[str] | None) -> tuple[str, ...]:
        if entity_types is None:
            return self.entity_types
        types = tuple(sorted(set(entity_types)))
        missing = [t for t in types if t not in self.entity_types]
        if missing:
            raise ValueError(f"this scrubber does not look for {missing}; it looks for {list(self.entity_types)}")
        return types

    # -- nested data ----------------------------------------------------------------------------
    def scrub(self, obj: Any) -> tuple[Any, Counter]:
        """Recursively scrub every string inside dicts/lists/tuples; returns a new object and counts.

        Dict keys, numbers and other non-string leaves are kept as they are; containers are rebuilt,
        so the input is never mutated.
        """
        counts: Counter = Counter()
        return self._walk(obj, counts), counts

    def _walk(self, obj: Any, counts: Counter) -> Any:
        if isinstance(obj, str):
            new, found = self.scrub_text(obj)
            counts.update(found)
            return new
        if isinstance(obj, Mapping):
            return {k: self._walk(v, counts) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self._walk(v, counts) for v in obj]
        if isinstance(obj, tuple):
            items = [self._walk(v, counts) for v in obj]
            return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
        return obj

    def scrub_records(self, records: Iterable[Mapping], fields: Iterable[str] | None = None) -> tuple[list[dict], Counter]:
        """Scrub a list of records (episodes, TRL chat demos, preference pairs, imported traces).

        ``fields``: top-level keys to scrub (each walked recursively); None scrubs every value.
        Returns new records and the total count per entity type.
        """
        keys = None if fields is None else set(fields)
        counts: Counter = Counter()
        out = []
        for record in records:
            if not isinstance(record, Mapping):
                raise TypeError(f"records must be mappings, got {type(record).__name__}")
            out.append({k: (self._walk(v, counts) if keys is None or k in keys else v) for k, v in record.items()})
        return out, counts

    def surviving(self, records: Any, entity_types: Iterable[str] | None = None, fields: Iterable[str] | None = None) -> Counter:
        """Re-scan (without changing) ``records``; counts of ``entity_types`` still present. Empty means the gate passes."""
        types = self._check_types(entity_types)
        keys = None if fields is None else set(fields)
        counts: Counter = Counter()

        def walk(obj: Any) -> None:
            if isinstance(obj, str):
                if obj.strip():
                    counts.update(dict(self._scan_cached(obj, types)))
            elif isinstance(obj, Mapping):
                for v in obj.values():
                    walk(v)
            elif isinstance(obj, (list, tuple)):
                for v in obj:
                    walk(v)

        if keys is not None and isinstance(records, (list, tuple)):
            for record in records:
                for k, v in record.items():
                    if k in keys:
                        walk(v)
        else:
            walk(records)
        return +counts

    def cache_info(self):
        """``functools`` cache statistics of the scrub memo."""
        return self._scrub_cached.cache_info()


@functools.lru_cache(maxsize=None)
def _default(entity_types: tuple[str, ...] | None) -> PiiScrubber:
    return PiiScrubber(entity_types)


def default_scrubber(entity_types: Iterable[str] | None = None) -> PiiScrubber:
    """A process-wide scrubber per entity-type set (built on first use)."""
    return _default(None if entity_types is None else tuple(sorted(set(entity_types))))


def scrub_records(records: Iterable[Mapping], fields: Iterable[str] | None = None, *, scrubber: PiiScrubber | None = None):
    """``PiiScrubber.scrub_records`` with the default scrubber."""
    return (scrubber or default_scrubber()).scrub_records(records, fields)


def surviving(records: Any, entity_types: Iterable[str] | None = None, *, scrubber: PiiScrubber | None = None) -> Counter:
    """Counts of ``entity_types`` (default: all active) still found in ``records``; for the blocking check."""
    if scrubber is None:
        scrubber = default_scrubber(entity_types)
    return scrubber.surviving(records, entity_types)


def counts_metadata(counts: Mapping[str, int], entity_types: Iterable[str] = ENTITY_TYPES, prefix: str = "pii_") -> dict[str, int]:
    """Flat ``{"pii_email_address": n, ..., "pii_total": n}`` with zeros for every type: Dagster metadata / MLflow metrics."""
    types = list(dict.fromkeys([*entity_types, *counts]))
    out = {f"{prefix}{t.lower()}": int(counts.get(t, 0)) for t in types}
    out[f"{prefix}total"] = int(sum(counts.values()))
    return out
