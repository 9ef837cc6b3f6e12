"""The paper's tables and the embedded default as config files (``get_config(arg)``).

Installed with preact as the package ``preact.experiments``, so that a launch names a
row without a path from any directory: ``--config=table2:full_preact,depth=164`` is
``--config=experiments/table2.py:full_preact,depth=164`` here.
"""
