"""Free text as the gateway takes it in and writes it out: one rule for every output.

What people type (a request's description, a note, a comment, a proposal's title) reaches
Open311 XML, CSV and JSON. XML 1.0 cannot carry most control characters at all, a lone
surrogate cannot be encoded as UTF-8, and a spreadsheet runs a cell that starts with `=` as a
formula. So control characters are replaced at intake (`clean`), and a CSV cell that a
spreadsheet would read as a formula is written as text (`csv_cell`).
"""

from __future__ import annotations

import re

# C0 controls but tab, line feed and carriage return; DEL and the C1 controls; the two
# non-characters XML refuses; lone surrogates (JSON's "\ud800" decodes to one).
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffe\uffff\ud800-\udfff]")
REPLACEMENT = "\ufffd"
# OWASP's list: a spreadsheet reads a cell starting with one of these as a formula.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")


def clean(text: str) -> str:
    """`text` with every character that some output cannot carry replaced by U+FFFD."""
    return _CONTROL.sub(REPLACEMENT, text)


def csv_cell(value: object) -> object:
    """A value for a CSV cell: text that could start a formula gets a leading apostrophe."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value
