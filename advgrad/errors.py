"""Exceptions that advgrad raises for bad input; the CLI prints them as one line."""

from __future__ import annotations


class AdvgradError(Exception):
    """Base class of every error advgrad reports to a user as one line."""


class InputFileError(AdvgradError):
    """A model or dataset file that advgrad refuses to read, or cannot write.

    Parameters
    ----------
    path : str or os.PathLike
        The file.
    dataset : str or None
        The HDF5 object inside the file ("/W1", "/X"), or None for the file itself.
    reason : str
        Why it was refused, in words a user can act on.
    """

    def __init__(self, path, dataset: str | None, reason: str) -> None:
        self.path = str(path)
        self.dataset = dataset
        self.reason = reason
        where = self.path if dataset is None else f"{self.path}:{dataset}"
        super().__init__(f"{where}: {reason}")


def printable(text: object) -> str:
    """``str(text)`` safe to show on a terminal as part of one line.

    Every character that is not printable (control characters such as ESC and newline, line
    and paragraph separators, bidirectional overrides) is shown as its Python escape
    (``\\x1b``, ``\\n``, ``\\u202e``), and a backslash as ``\\\\``, so a string that came from a
    file can neither move the cursor, set the window title nor forge another line. Rich markup
    is not escaped here: the command line does that where it prints.
    """
    text = str(text)
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(
        "\\\\" if char == "\\" else char if char.isprintable() else repr(char)[1:-1]
        for char in text
    )
