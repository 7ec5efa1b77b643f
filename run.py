"""gcode-exp entry point: `python run.py [task=train|eval|prepare] [group=option ...] [key=value ...]`.

The same as `python -m gcode_exp ...` and the `gcode-exp ...` command: all three run gcode_exp/cli.py's `main`."""

from gcode_exp.cli import main

if __name__ == "__main__":
    main()
