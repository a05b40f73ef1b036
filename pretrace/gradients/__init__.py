"""The one gradient provider every method shares: losses (the Task) and per-example module gradients."""

from pretrace.gradients.capture import CapturedBatch, capture
from pretrace.gradients.task import LanguageModelingTask, Task

__all__ = ["CapturedBatch", "LanguageModelingTask", "Task", "capture"]
