"""The commands' one error for bad input found before anything starts (exit status 2, one line saying what to fix)."""


class SetupError(Exception):
    """Bad data or settings found before the simulation starts (exit status 2)."""
