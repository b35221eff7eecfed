"""The one base class for errors a user can cause and fix (bad params, files, checkpoints).

Stages and the `visual-echoes` command print such an error as one sentence and exit non-zero;
anything else is a bug and keeps its traceback.
"""


class PipelineError(Exception):
    """A problem with the user's input, reported as one sentence without a traceback."""
