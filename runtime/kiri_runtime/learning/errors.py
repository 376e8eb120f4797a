"""Errors of the learning loop."""

from __future__ import annotations


class LearningError(Exception):
    """A problem the user can fix: bad settings, unreadable data, weights that do not fit the model."""
