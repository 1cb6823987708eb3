"""Errors whose message is meant for people: the UI, the API and the CLI show `str(err)` as is."""


class MiniGPT4Error(Exception):
    """Base class: anything raised on purpose by this library."""


class InputError(MiniGPT4Error, ValueError):
    """The caller gave something we cannot use (a bad image, an empty question, a bad setting)."""


class WeightsError(MiniGPT4Error):
    """A weight file is missing, unreadable, or does not have the keys and shapes we expect."""
