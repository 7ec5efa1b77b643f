"""`python -m gcode_exp ...`: the same as `python run.py ...` (gcode_exp/cli.py), from any working folder."""

from gcode_exp.cli import main

if __name__ == "__main__":
    main()
