"""
The error of a simulated Exoscale API operation.
"""

from __future__ import annotations


class ApiError(Exception):
    """
    An API request that fails with `status` and the body `{"message": message}`.

    Args:
        status: The HTTP status, such as 404.
        message: The message of the body, naming the invalid or missing value.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
