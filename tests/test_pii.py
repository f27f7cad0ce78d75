"""PII gate (dpo_driver.pii): Presidio finds planted PII in episodes, chat demos and preference pairs,
replaces it in place, leaves MiniWoB action strings alone, and the re-scan for the blocking check is clean."""

import copy
import socket
from collections import Counter

import pytest

from dpo_driver.pii import (
    ENTITY_TYPES,
    PATTERN_ENTITY_TYPES,
    PiiScrubber,
    counts_metadata,
    placeholder,
    surviving,
)

EMAIL = "jane.doe@example.com"
PHONE = "+1 212 555 0199"
CARD = "4111 1111 1111 1111"
IP = "192.168.10.23"
IBAN = "DE89 3704 0044 0532 0130 00"
PLANTED = {"EMAIL_ADDRESS": EMAIL, "PHONE_NUMBER": PHONE, "CREDIT_CARD": CARD, "IP_ADDRESS": IP, "IBAN_CODE": IBAN}

MINIWOB_STRINGS = [
    'click button "Submit"',
    'type textbox "4"',
    "Enter 03/15/2016",
    "Select 5:30 PM",
    "Select 12:30",
    'type textbox "16937"',  # 5-digit: phonenumbers calls it a German short number; dropped by min_phone_digits
    'type textbox "482913"',
    "click element 42 at (120, 340)",
    "Select 2016-03-15 from the datepicker",
    'Enter "Submit" then press OK. Expand the section titled "Lorem ipsum".',
    "ref 1234 5678 9012",  # not Luhn-valid / not a card
    "Type AB12 CDEF GHIJ into the box",  # IBAN-shaped, bad checksum
    "scroll down 3 and click the 2nd link",
]


@pytest.fixture(scope="module")
def scrubber():
    # Pattern recognizers only: deterministic whether or not a spaCy model happens to be installed.
    return PiiScrubber(PATTERN_ENTITY_TYPES, spacy_model=None)


def _episode():
    return {
        "episode_id": "ep-1",
        "task": "miniwob/email-inbox",
        "reward": 1.0,
        "steps": [
            {"prompt": f"Forward the mail from {EMAIL} to the number {PHONE}.", "output": "click link 'Forward'", "action": "click 12"},
            {"prompt": "Pay the invoice", "output": f"Card {CARD}, server at {IP}", "action": f'type textbox "{IBAN}"'},
            {"prompt": 'click button "Submit"', "output": "Select 5:30 PM", "action": 'type textbox "4"'},
        ],
    }


def _chat_demo():
    return {
        "prompt": [
            {"role": "system", "content": "You are a web agent."},
            {"role": "user", "content": f"Send the receipt to {EMAIL} and call {PHONE}."},
        ],
        "completion": [{"role": "assistant", "content": f'type textbox "{CARD}"'}],
    }


def _preference():
    return {
        "prompt": [{"role": "user", "content": "Task: transfer the rent. Enter 03/15/2016."}],
        "chosen": [{"role": "assistant", "content": f'type textbox "{IBAN}"'}],
        "rejected": [{"role": "assistant", "content": f"ping {IP} and mail {EMAIL}"}],
        "score_chosen": 1.0,
        "score_rejected": 0.0,
    }


def test_entity_types_and_placeholder():
    assert set(PATTERN_ENTITY_TYPES) <= set(ENTITY_TYPES)
    assert set(ENTITY_TYPES) - set(PATTERN_ENTITY_TYPES) <= {"PERSON"}
    assert placeholder("EMAIL_ADDRESS") == "<EMAIL_ADDRESS>"


@pytest.mark.parametrize("entity_type", list(PLANTED))
def test_scrub_text_each_type(scrubber, entity_type):
    value = PLANTED[entity_type]
    text, counts = scrubber.scrub_text(f"before {value} after")
    assert text == f"before <{entity_type}> after"
    assert counts == Counter({entity_type: 1})


@pytest.mark.parametrize("text", MINIWOB_STRINGS)
def test_miniwob_strings_unchanged(scrubber, text):
    assert scrubber.scrub_text(text) == (text, Counter())
    assert not scrubber.surviving([text])


def test_placeholders_not_redetected(scrubber):
    text = " ".join(placeholder(t) for t in PATTERN_ENTITY_TYPES) + " EMAIL_ADDRESS PHONE_NUMBER"
    assert scrubber.scrub_text(text) == (text, Counter())
    assert not scrubber.surviving({"x": text})


def test_episode_steps_scrubbed_in_place(scrubber):
    episode = _episode()
    original = copy.deepcopy(episode)
    assert surviving([episode], scrubber=scrubber) == Counter({t: 1 for t in PLANTED})

    (clean,), counts = scrubber.scrub_records([episode])

    assert counts == Counter({t: 1 for t in PLANTED})
    assert episode == original  # input untouched
    assert clean is not episode and clean["steps"] is not episode["steps"]
    s0, s1, s2 = clean["steps"]
    assert s0["prompt"] == "Forward the mail from <EMAIL_ADDRESS> to the number <PHONE_NUMBER>."
    assert s1["output"] == "Card <CREDIT_CARD>, server at <IP_ADDRESS>"
    assert s1["action"] == 'type textbox "<IBAN_CODE>"'
    assert s2 == original["steps"][2]  # MiniWoB strings untouched
    assert clean["reward"] == 1.0 and clean["episode_id"] == "ep-1"
    assert not surviving([clean], scrubber=scrubber)
    assert not scrubber.surviving([clean], ["EMAIL_ADDRESS", "IBAN_CODE"])


def test_chat_demo_and_preference_records(scrubber):
    demo, pref = _chat_demo(), _preference()
    originals = copy.deepcopy([demo, pref])
    before = scrubber.surviving([demo, pref])
    assert before == Counter({"EMAIL_ADDRESS": 2, "PHONE_NUMBER": 1, "CREDIT_CARD": 1, "IBAN_CODE": 1, "IP_ADDRESS": 1})

    (c_demo, c_pref), counts = scrubber.scrub_records([demo, pref])

    assert counts == before
    assert [demo, pref] == originals
    assert c_demo["prompt"][0] == demo["prompt"][0]
    assert c_demo["prompt"][1] == {"role": "user", "content": "Send the receipt to <EMAIL_ADDRESS> and call <PHONE_NUMBER>."}
    assert c_demo["completion"] == [{"role": "assistant", "content": 'type textbox "<CREDIT_CARD>"'}]
    assert c_pref["prompt"] == pref["prompt"]
    assert c_pref["chosen"][0]["content"] == 'type textbox "<IBAN_CODE>"'
    assert c_pref["rejected"][0]["content"] == "ping <IP_ADDRESS> and mail <EMAIL_ADDRESS>"
    assert c_pref["score_chosen"] == 1.0
    assert not scrubber.surviving([c_demo, c_pref])


def test_fields_restrict_what_is_scrubbed(scrubber):
    record = {"prompt": f"mail {EMAIL}", "meta": f"operator {EMAIL}"}
    (clean,), counts = scrubber.scrub_records([record], fields=["prompt"])
    assert clean == {"prompt": "mail <EMAIL_ADDRESS>", "meta": f"operator {EMAIL}"}
    assert counts == Counter({"EMAIL_ADDRESS": 1})
    assert not scrubber.surviving([clean], fields=["prompt"])
    assert scrubber.surviving([clean]) == Counter({"EMAIL_ADDRESS": 1})


def test_generic_walk_keeps_shapes(scrubber):
    obj = {"a": [f"ip {IP}", ("x", f"{EMAIL}"), 3, None], "b": {"c": {"d": PHONE}}}
    clean, counts = scrubber.scrub(obj)
    assert clean == {"a": ["ip <IP_ADDRESS>", ("x", "<EMAIL_ADDRESS>"), 3, None], "b": {"c": {"d": "<PHONE_NUMBER>"}}}
    assert counts == Counter({"IP_ADDRESS": 1, "EMAIL_ADDRESS": 1, "PHONE_NUMBER": 1})


def test_memoized(scrubber):
    text = f"unique memo test {EMAIL}"
    before = scrubber.cache_info()
    for _ in range(50):
        assert scrubber.scrub_text(text)[0] == "unique memo test <EMAIL_ADDRESS>"
    after = scrubber.cache_info()
    assert after.misses - before.misses == 1
    assert after.hits - before.hits == 49


def test_counts_metadata():
    meta = counts_metadata(Counter({"EMAIL_ADDRESS": 2}), PATTERN_ENTITY_TYPES)
    assert meta["pii_email_address"] == 2 and meta["pii_iban_code"] == 0 and meta["pii_total"] == 2
    assert set(meta) == {f"pii_{t.lower()}" for t in PATTERN_ENTITY_TYPES} | {"pii_total"}


def test_person_needs_a_model_and_nothing_is_downloaded():
    with pytest.raises(ValueError, match="PERSON"):
        PiiScrubber(["PERSON"], spacy_model=None)
    with pytest.raises(ValueError, match="not downloaded"):
        PiiScrubber(spacy_model="en_core_web_definitely_not_installed")
    with pytest.raises(ValueError, match="does not look for"):
        PiiScrubber(["EMAIL_ADDRESS"], spacy_model=None).surviving(["x"], ["IBAN_CODE"])


def test_email_validation_is_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    fresh = PiiScrubber(["EMAIL_ADDRESS"], spacy_model=None)
    assert fresh.scrub_text(f"to {EMAIL}") == ("to <EMAIL_ADDRESS>", Counter({"EMAIL_ADDRESS": 1}))
    assert fresh.scrub_text("to someone@host.notarealtld")[1] == Counter()


def test_person_path_with_a_local_spacy_pipeline(tmp_path):
    # No NER model can be downloaded here; a blank pipeline with an entity ruler stands in for one
    # and checks the spaCy wiring (SpacyNlpEngine + SpacyRecognizer) and the placeholder allow-list.
    spacy = pytest.importorskip("spacy")
    nlp = spacy.blank("en")
    ruler = nlp.add_pipe("entity_ruler")
    ruler.add_patterns([{"label": "PERSON", "pattern": "Alice Smith"}, {"label": "PERSON", "pattern": "PERSON"}])
    nlp.to_disk(tmp_path / "ner")

    s = PiiScrubber(spacy_model=str(tmp_path / "ner"))
    assert "PERSON" in s.entity_types
    text, counts = s.scrub_text(f"I am Alice Smith, mail {EMAIL}")
    assert text == "I am <PERSON>, mail <EMAIL_ADDRESS>"
    assert counts == Counter({"PERSON": 1, "EMAIL_ADDRESS": 1})
    assert s.scrub_text(text) == (text, Counter())  # "<PERSON>" is not itself a person
    assert s.surviving(["Alice Smith"], ["PERSON"]) == Counter({"PERSON": 1})
