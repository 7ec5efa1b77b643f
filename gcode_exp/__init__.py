"""gcode-exp: infer the executed G-code of a CNC machine from its sensor streams."""


class GcodeExpError(Exception):
    """A user-facing failure (bad data, bad config): printed as one line, never a traceback."""
