"""A gallery of user-style HTAF models and a matrix runner that exports each through the CLI.

Not a test module (no test_*.py here yet): ``save_all.py`` writes the models in every format a user
might save them in, ``run_matrix.py`` runs ``htaf-export`` on each and tabulates what fails.
"""
