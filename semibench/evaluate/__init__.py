"""Evaluation stage: a finished run's best model on the test split (``score``), pixel metrics
(``metrics``), nucleus instances and their metrics (``instances``)."""
