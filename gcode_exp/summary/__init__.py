"""The parts of `python -m gcode_exp.summarize` (gcode_exp/summarize.py, the command): reading run folders
(runs), grouping them (groups), the tables and their statistics (tables), the chart (chart) and the Optuna
trials (trials)."""
