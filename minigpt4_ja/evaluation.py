"""Placeholder: filled in by its own issue."""


def add_arguments(parser):
    pass


def main(args) -> int:
    raise SystemExit("not implemented yet")
