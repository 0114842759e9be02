"""The events of a job, as ``watch`` yields them and a ``progress=`` callable receives them.

A stream ends with exactly one of Completed, Failed or Cancelled. These names mirror the
proto's; the exceptions of the same name live in ``s3net_client`` (``s3net_client.Cancelled``
is the error, ``s3net_client.events.Cancelled`` the event).
"""

from .results import Cancelled, Completed, Failed, JobEvent, Progress, Queued, Started

__all__ = ["JobEvent", "Queued", "Started", "Progress", "Completed", "Failed", "Cancelled"]
