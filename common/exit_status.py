"""The exit status of every command (flower-simulation, oppu-deploy, oppu-study, oppu-audit, oppu-adapter)."""

DONE = 0
FAILED = 1  # the run (or the audit) did not complete; the command said why
BAD_INPUT = 2  # the user's input or flags, with one line naming what to fix (argparse's own status for bad flags)
INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it)
