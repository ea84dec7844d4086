"""The run-time half: the Executor, its input checks, weight updates and profile."""

from nativert.backend.runtime.executor import Executor
from nativert.backend.runtime.profile import ProfileRow, ProfileTable

__all__ = ["Executor", "ProfileRow", "ProfileTable"]
