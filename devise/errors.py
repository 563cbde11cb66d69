"""The one base class of every error a user can cause; the CLI prints it as one line."""

from __future__ import annotations


class DeviseError(Exception):
    """A mistake the user can fix (a missing file, a word with no vector, a bad flag value).

    `devise` prints ``devise COMMAND: error: <message>`` and exits with EXIT_CODE; subclasses
    set their own code where a scheduler should tell them apart (e.g. 75: skipped, try later).
    """

    EXIT_CODE = 2
