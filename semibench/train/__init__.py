"""Training stage: the engine (:class:`~semibench.train.engine.Trainer`) and its parts: batches,
update, validation, logging, checkpoints and the run directory, EMA teachers, schedules, the
device and the execution options."""
