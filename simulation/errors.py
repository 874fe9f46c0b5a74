"""The commands' errors: bad input found before anything starts (exit status 2, one line saying what to fix), and
Flower's engine stopping under a run (exit status 1)."""


class SetupError(Exception):
    """Bad data or settings found before the simulation starts (exit status 2)."""


class EngineStopped(Exception):
    """Flower's simulation engine raised (e.g. Ray could place no client): no reply will come, while the engine's
    ServerApp thread would wait out the reply timeout for them."""
