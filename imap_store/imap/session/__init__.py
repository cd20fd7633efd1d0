"""The IMAP session state machine (RFC 3501 §3, §6), sans-IO, by command family:

- :mod:`.state`: connection states, the state table (:data:`ALLOWED`, :func:`check_state`),
  the selected mailbox (:class:`Selected`), the edge's interfaces;
- :mod:`.core`: :class:`Session` (events, output, completion) and the dispatch table
  (:data:`HANDLERS`: one handler per command type);
- handlers: :mod:`.auth` (any state, login), :mod:`.mailboxes` (authenticated state),
  :mod:`.selected` (SELECT, CLOSE, EXPUNGE, IDLE, changes of other sessions), :mod:`.fetch`
  (FETCH, STORE), :mod:`.search` (SEARCH), :mod:`.copy` (COPY, MOVE).
"""

from imap_store.imap.session.core import HANDLERS, Session
from imap_store.imap.session.state import ALLOWED, Action, State

#: What the edge (``imap_store.imap.server``) and the tests take from the package; the rest
#: is imported from its module.
__all__ = ["ALLOWED", "HANDLERS", "Action", "Session", "State"]
