"""Problems: the record, loaders for real data formats, and the synthetic embedded task."""

from attnrl.data.problem import Problem

__all__ = ["Problem"]
