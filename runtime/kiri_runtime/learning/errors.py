"""Errors of the learning loop, each with the HTTP status the aggregator answers with."""

from __future__ import annotations


class LearningError(Exception):
    """A problem the user can fix: bad arguments, unreadable data, weights that do not fit the model."""

    status = 400


class BadDelta(LearningError):
    """An update that cannot be decoded or does not fit the round (wrong names, shapes, values)."""

    status = 400


class WrongShape(BadDelta):
    """Decodes fine but names tensors or shapes other than the round's."""

    status = 422


class Unauthorized(LearningError):
    status = 401


class Forbidden(LearningError):
    status = 403


class Conflict(LearningError):
    """Wrong round, wrong base model, or a site that already contributed to this round."""

    status = 409


class RoundClosed(LearningError):
    status = 410


class TooLarge(LearningError):
    status = 413
