"""One exception type for every user-facing mistake: the CLI prints its message on one line."""


class PyrovaeError(Exception):
    """Bad input or an unusable state, with a message that says what was wrong and what is accepted."""


class NonFiniteLoss(PyrovaeError):
    """The training loss became NaN or infinite."""


class PyrovaeWarning(UserWarning):
    """Something done differently from what was asked (and said so): the CLI prints it as one ``note:`` line."""


class PeerLost(PyrovaeError):
    """A data-parallel worker lost another (it died, or did not answer in time): the run stops, its checkpoint kept."""
