"""The training loop. Start at ``fit.py``: ``TrainingLoop.fit`` and ``train_epoch`` fire every event of SPEC §1 on
its own line, in the order of the diagram; every other file here is one concern ``fit.py`` calls in one line:

- ``fit.py``: the loop (epochs, the train pass, validation, test, history).
- ``step.py``: the work of one train batch (forward and loss, backward, optimizer step; accumulation, AMP, DDP).
- ``stops.py``: whether the loop goes on (callback stops, Ctrl-C, non-finite losses, every rank agreeing).
- ``resume.py``: what a resume restores, and where the running epoch is (the mid-epoch checkpoint record).
- ``checkpoints.py``: which checkpoint files are written when, and what they hold.
- ``evaluate.py``: the no-grad passes (validation, test, ``Trainer.test``).
- ``parts.py``: the immutable products of building a run, and the meters that make ``metrics_dict``.

The loop runs what it is given: nothing here imports the trainer, the builders, the recipes or the CLI.
"""
