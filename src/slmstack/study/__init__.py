"""Does stacking help? A controlled study of a two-stage stack against single models with the same data and budget.

- :mod:`.config`: the study YAML;
- :mod:`.arms`: the arms (A0-A3, S2): their stages, adapters and training data;
- :mod:`.run`: the resumable grid of (arm, seed) cells, training and evaluation;
- :mod:`.report`: the table, the paired tests, the plot.
"""
