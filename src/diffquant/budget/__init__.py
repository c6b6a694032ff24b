"""Memory budgets: which component is resident when (residency), what each phase takes
(memory), and which scheme each component gets to fit a budget (planner).

Example:
    >>> from diffquant.budget import parse_memory
    >>> parse_memory("8GB")
    8000000000
"""

from .memory import parse_memory

__all__ = ["parse_memory"]
