"""Stopping the background tasks of a service (ARCHITECTURE practice 9: every task is
referenced and awaited)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel each task still running and wait until it has ended (``None`` and finished
    tasks are left as they are)."""
    for task in tasks:
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
