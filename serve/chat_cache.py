"""Chat sessions kept between requests: a client that resends a conversation whose earlier turns this
server generated gets the session holding that conversation's KV cache, so only the new turn is
prefilled (runtime/chat.py: the output is the one a full prefill gives).

OpenAI's API is stateless, so a conversation is recognised by its messages: a session is filed
under the conversation it holds (system, user, assistant, ... with the assistant turns as this
server wrote them) and a request whose messages before its last user message equal that key takes
it. A session serves one request at a time (checked out while it runs, filed again when the reply
is complete); the `size` most recently used idle sessions per model are kept, each holding a KV
cache as long as its conversation.
"""

from __future__ import annotations

import collections
import json
import threading
from typing import Any


def _key(messages: list[dict[str, str]]) -> str:
    return json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)


class ChatCache:
    def __init__(self, generator: Any, *, size: int):
        self.generator = generator
        self.size = size
        self._idle: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0

    def session_for(self, messages: list[dict[str, str]]) -> Any | None:
        """The session to answer `messages` with (its last one a user message): a cached one holding the
        turns before it, or a new one for a first turn; None when neither fits (a history of turns
        this server did not generate, or caching off)."""
        if self.size == 0 or not messages or messages[-1]["role"] != "user":
            return None
        with self._lock:
            session = self._idle.pop(_key(messages[:-1]), None)
            if session is not None:
                self.hits += 1
                return session
        history = messages[:-1]
        if not history or (len(history) == 1 and history[0]["role"] == "system"):
            from edgellama.runtime.chat import ChatSession

            return ChatSession(self.generator, system=history[0]["content"] if history else None)
        return None

    def file(self, session: Any) -> None:
        """Keep `session` (its reply complete) for the conversation's next turn; the oldest idle go first."""
        if self.size == 0:
            return
        with self._lock:
            self._idle[_key(session.messages)] = session
            self._idle.move_to_end(_key(session.messages))
            while len(self._idle) > self.size:
                self._idle.popitem(last=False)

    def __len__(self) -> int:
        return len(self._idle)
