""""Rank 0 does it, every rank gets the result or the error": written once for any broadcast.

The converter broadcasts with mpi4py, the trainer with Horovod; both hand
their broadcast function in. Rank 0's failure rides on the same broadcast as
its result, so no other rank is left waiting in a collective that rank 0 never
joins (which under Horovod hangs until the stall shutdown).
"""

from collections.abc import Callable
from typing import Any


def on_root(
    is_root: bool,
    broadcast: Callable[[Any], Any],
    fn: Callable[[], Any],
    error_type: type[Exception],
    catch: tuple[type[BaseException], ...] = (),
    describe: Callable[[BaseException], str] = str,
):
    """Runs `fn` on rank 0 only; every rank returns its result or raises `error_type` with its message.

    `error_type` raised by `fn` is passed on, and so are the `catch` types,
    turned into `error_type` with the one line `describe` makes of them.
    Any other exception (a bug, not bad input) is raised again on rank 0 with
    its traceback, after the other ranks got `error_type` naming it: they
    would otherwise wait in the broadcast for ever.
    """
    result = None
    if is_root:
        try:
            result = ("ok", fn())
        except (error_type, *catch) as e:
            result = ("error", describe(e))
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0]
            broadcast(("error", f"rank 0 failed: {type(e).__name__}: {first}"))
            raise
    status, value = broadcast(result)
    if status == "error":
        raise error_type(value)
    return value
