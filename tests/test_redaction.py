"""Password scrubbing takes whatever a caller hands it: an exception's text is scrubbed like a string's."""

from __future__ import annotations

from nas import redaction


def test_scrub_takes_exceptions_and_masks_the_password_in_them(monkeypatch):
    monkeypatch.setattr(redaction, "_SECRETS", set())
    assert redaction.scrub(FloatingPointError("loss became nan")) == "loss became nan"  # no secrets: its text
    redaction.remember("postgresql+psycopg2://nas:s3cret-pw@127.0.0.1:5432/nas")
    error = FloatingPointError("cannot reach s3cret-pw at step 2")
    assert redaction.scrub(error) == "cannot reach *** at step 2"  # used to raise TypeError: not iterable
    assert redaction.scrub("s3cret-pw") == "***" and redaction.scrub("") == ""
