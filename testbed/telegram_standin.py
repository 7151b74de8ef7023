"""A stand-in Telegram Bot API server for the test fleet (Telegram's servers cannot run here):

Enough of the Bot API for python-telegram-bot 22.x (as driven by Hermes 0.19.0's Telegram
adapter with ``platforms.telegram.extra.base_url``) to connect, long-poll and answer:

    api = BotApiStandIn(token="123456:TEST")
    api.start()
    # Hermes config: platforms.telegram.extra.base_url = api.url ; env TELEGRAM_BOT_TOKEN = api.token
    api.push_text(chat_id=111, user_id=111, text="hello")
    texts = api.wait_reply(111, after_count=0, timeout=60)   # the bot's new messages in chat 111
    api.stop()

Behaviour that matters:
- getUpdates honours ``offset`` (confirms and forgets earlier updates), ``limit`` and ``timeout``
  (long poll: answers as soon as an update is queued, else after ``timeout`` seconds with []).
- deleteWebhook with ``drop_pending_updates=true`` empties the queue, as the real Bot API does
  (``drop_on_delete_webhook=False`` keeps the queue, to tell Hermes' behaviour apart from the
  server's). Dropped updates are kept in ``dropped``.
- sendMessage / editMessageText / deleteMessage keep the bot's messages per chat;
  ``sent(chat_id)`` gives their current texts in send order. sendMessageDraft texts (streaming
  previews in private chats) go to ``drafts``, not ``sent``.
- Methods in ``NOT_FOUND`` (Bot API 10.1 rich messages) answer 404 "Not Found", as an older Bot
  API server does, so Hermes latches its rich path off and uses sendMessage.
- ``delivered`` lists updates getUpdates actually wrote to a client (not confirmed yet: the
  real Bot API forgets an update only when a later getUpdates passes a higher ``offset``).
- Any other method answers ``true``. Every call is logged in ``calls`` as (time, method, params).
- A wrong token answers 401 Unauthorized.
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NOT_FOUND = frozenset({"sendRichMessage", "sendRichMessageDraft"})


def _decode(value: str):
    """Bot API form fields carry objects/arrays/booleans/numbers JSON-encoded."""
    v = value.strip()
    if v[:1] in "{[" or v in ("true", "false", "null"):
        try:
            return json.loads(v)
        except ValueError:
            return value
    return value


class BotApiStandIn:
    def __init__(self, token: str = "123456:NEVERDARK-TEST", host: str = "127.0.0.1",
                 port: int = 0, *, bot_id: int = 123456, username: str = "neverdark_test_bot",
                 drop_on_delete_webhook: bool = True, verbose: bool = False) -> None:
        self.token = token
        self.host = host
        self._port = port
        self.bot_user = {"id": bot_id, "is_bot": True, "first_name": "Neverdark Test",
                         "username": username, "can_join_groups": True,
                         "can_read_all_group_messages": False, "supports_inline_queries": False}
        self.drop_on_delete_webhook = drop_on_delete_webhook
        self.verbose = verbose
        self.calls: list[tuple[float, str, dict]] = []
        self.drafts: list[tuple[int, str]] = []
        self.dropped: list[dict] = []
        self.delivered: list[dict] = []  # updates handed out by getUpdates (possibly repeatedly)
        self._queue: list[dict] = []
        self._update_ids = itertools.count(1)
        self._user_msg_ids = itertools.count(1)
        self._bot_msg_ids = itertools.count(100000)
        self._messages: dict[int, list[dict]] = {}  # chat_id -> bot messages {message_id, text}
        self._cond = threading.Condition()
        self._stopping = False
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> "BotApiStandIn":
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                self._serve()

            def do_POST(self):
                self._serve()

            def _serve(self):
                parsed = urllib.parse.urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                params = {k: _decode(v[-1]) for k, v in
                          urllib.parse.parse_qs(parsed.query, keep_blank_values=True).items()}
                params.update(api._parse_body(self.headers.get("Content-Type", ""), raw))
                status, body = api._dispatch(parsed.path, params)
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    # The client left (e.g. a gateway killed mid long-poll): those updates
                    # were never received; they stay queued until a later offset confirms.
                    api._undeliver(body)
                    self.close_connection = True

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server((self.host, self._port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def port(self) -> int:
        assert self._server, "not started"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        """The base_url for python-telegram-bot (it appends the token and /method)."""
        return f"http://{self.host}:{self.port}/bot"

    # --- test API -------------------------------------------------------------------------

    def push_text(self, chat_id: int, user_id: int, text: str, *, chat_type: str = "private",
                  first_name: str = "Tester") -> dict:
        """Queue an incoming text message from user_id in chat_id; returns the update."""
        now = int(time.time())
        chat = {"id": int(chat_id), "type": chat_type}
        if chat_type == "private":
            chat["first_name"] = first_name
        else:
            chat["title"] = f"chat {chat_id}"
        update = {"update_id": next(self._update_ids), "message": {
            "message_id": next(self._user_msg_ids), "date": now, "chat": chat,
            "from": {"id": int(user_id), "is_bot": False, "first_name": first_name,
                     "username": f"user{user_id}", "language_code": "en"},
            "text": text}}
        with self._cond:
            self._queue.append(update)
            self._cond.notify_all()
        return update

    def pending(self) -> list[dict]:
        """Updates queued and not yet confirmed by a later getUpdates offset."""
        with self._cond:
            return list(self._queue)

    def sent(self, chat_id: int) -> list[str]:
        """Current texts of the bot's (not deleted) messages in chat_id, in send order."""
        with self._cond:
            return [m["text"] for m in self._messages.get(int(chat_id), []) if not m["deleted"]]

    def wait_reply(self, chat_id: int, after_count: int = 0, timeout: float = 60.0,
                   settle: float = 1.0, match=None) -> list[str]:
        """Wait until the bot has more than after_count messages in chat_id and none of them
        changed (edits) for `settle` seconds; return the new ones. With `match` (a substring, or
        a callable on the text), also wait until one of the new messages matches it (Hermes
        sends notices such as "No home channel is set" before the answer of a chat's first
        turn). TimeoutError otherwise."""
        if isinstance(match, str):
            needle = match
            match = lambda text: needle in text  # noqa: E731
        deadline = time.monotonic() + timeout
        last, stable_since = None, None
        while True:
            now = time.monotonic()
            texts = self.sent(chat_id)
            new = texts[after_count:]
            if new and (match is None or any(match(t) for t in new)):
                if texts != last:
                    last, stable_since = texts, now
                elif now - stable_since >= settle:
                    return new
            else:
                last = None
            if now >= deadline:
                raise TimeoutError(f"no settled reply in chat {chat_id} after {timeout}s "
                                   f"(new bot messages: {new!r})")
            time.sleep(0.1)

    def methods(self) -> list[str]:
        return [m for _, m, _ in self.calls]

    # --- Bot API --------------------------------------------------------------------------

    @staticmethod
    def _parse_body(ctype: str, raw: bytes) -> dict:
        if not raw:
            return {}
        ctype_l = ctype.lower()
        if ctype_l.startswith("application/json"):
            try:
                body = json.loads(raw)
                return body if isinstance(body, dict) else {}
            except ValueError:
                return {}
        if ctype_l.startswith("multipart/form-data"):
            msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + raw)
            out = {}
            for part in msg.iter_parts():
                name = part.get_param("name", header="content-disposition")
                if not name:
                    continue
                if part.get_filename():
                    out[name] = {"filename": part.get_filename(),
                                 "size": len(part.get_payload(decode=True) or b"")}
                else:
                    out[name] = _decode(part.get_content())
            return out
        pairs = urllib.parse.parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)
        return {k: _decode(v[-1]) for k, v in pairs.items()}

    def _dispatch(self, path: str, params: dict) -> tuple[int, dict]:
        prefix = "/bot"
        if not path.startswith(prefix) or "/" not in path[len(prefix):]:
            return 404, {"ok": False, "error_code": 404, "description": "Not Found"}
        token, method = path[len(prefix):].split("/", 1)
        with self._cond:
            self.calls.append((time.time(), method, params))
        if self.verbose:
            print(f"[botapi] {method} {params}", flush=True)
        if token != self.token:
            return 401, {"ok": False, "error_code": 401, "description": "Unauthorized"}
        if method in NOT_FOUND:
            return 404, {"ok": False, "error_code": 404, "description": "Not Found"}
        handler = getattr(self, "_m_" + method, None)
        result = handler(params) if handler else True
        if isinstance(result, tuple):  # (status, body) error
            return result
        return 200, {"ok": True, "result": result}

    def _chat(self, chat_id) -> dict:
        cid = int(chat_id)
        return ({"id": cid, "type": "private", "first_name": "Tester"} if cid > 0
                else {"id": cid, "type": "supergroup", "title": f"chat {cid}"})

    def _message(self, chat_id, message_id, text) -> dict:
        return {"message_id": message_id, "date": int(time.time()), "chat": self._chat(chat_id),
                "from": self.bot_user, "text": text}

    def _m_getMe(self, p):
        return self.bot_user

    def _m_logOut(self, p):
        return True

    def _m_getWebhookInfo(self, p):
        with self._cond:
            return {"url": "", "has_custom_certificate": False,
                    "pending_update_count": len(self._queue)}

    def _m_deleteWebhook(self, p):
        if p.get("drop_pending_updates") in (True, "true", "True", "1", 1) \
                and self.drop_on_delete_webhook:
            with self._cond:
                self.dropped.extend(self._queue)
                self._queue.clear()
        return True

    def _undeliver(self, body) -> None:
        result = body.get("result") if isinstance(body, dict) else None
        if isinstance(result, list) and result and isinstance(result[0], dict) \
                and "update_id" in result[0]:
            ids = {u["update_id"] for u in result}
            with self._cond:
                for u in reversed(self.delivered):
                    if u["update_id"] in ids:
                        self.delivered.remove(u)
                        ids.discard(u["update_id"])
                        if not ids:
                            break

    def _m_getUpdates(self, p):
        offset = int(p.get("offset") or 0)
        limit = max(1, min(100, int(p.get("limit") or 100)))
        timeout = float(p.get("timeout") or 0)
        deadline = time.monotonic() + timeout
        with self._cond:
            if offset:
                if offset < 0:  # -N: keep only the last N
                    del self._queue[:max(0, len(self._queue) + offset)]
                else:
                    self._queue[:] = [u for u in self._queue if u["update_id"] >= offset]
            while not self._queue and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            out = self._queue[:limit]
            self.delivered.extend(out)
            p["_returned"] = [u["update_id"] for u in out]  # visible in self.calls
            return out

    def _m_sendMessage(self, p):
        chat_id = int(p["chat_id"])
        with self._cond:
            mid = next(self._bot_msg_ids)
            self._messages.setdefault(chat_id, []).append(
                {"message_id": mid, "text": str(p.get("text", "")), "deleted": False,
                 "edits": 0, "t": time.time()})
        return self._message(chat_id, mid, str(p.get("text", "")))

    def _m_editMessageText(self, p):
        if "chat_id" not in p:  # inline message
            return True
        chat_id, mid = int(p["chat_id"]), int(p["message_id"])
        with self._cond:
            for m in self._messages.get(chat_id, []):
                if m["message_id"] == mid:
                    if m["text"] == str(p.get("text", "")):
                        return 400, {"ok": False, "error_code": 400, "description":
                                     "Bad Request: message is not modified: specified new "
                                     "message content and reply markup are exactly the same "
                                     "as a current content and reply markup of the message"}
                    m["text"] = str(p.get("text", ""))
                    m["edits"] += 1
                    m["t"] = time.time()
                    break
            else:
                return 400, {"ok": False, "error_code": 400,
                             "description": "Bad Request: message to edit not found"}
        return self._message(chat_id, mid, str(p.get("text", "")))

    def _m_deleteMessage(self, p):
        chat_id, mid = int(p["chat_id"]), int(p["message_id"])
        with self._cond:
            for m in self._messages.get(chat_id, []):
                if m["message_id"] == mid:
                    m["deleted"] = True
        return True

    def _m_sendMessageDraft(self, p):
        with self._cond:
            self.drafts.append((int(p.get("chat_id", 0)), str(p.get("text", ""))))
        return True

    def _m_getChat(self, p):
        return {**self._chat(p["chat_id"]), "accent_color_id": 0, "max_reaction_count": 11,
                "accepted_gift_types": {"unlimited_gifts": False, "limited_gifts": False,
                                        "unique_gifts": False, "premium_subscription": False}}

    def _m_getMyCommands(self, p):
        return []


__all__ = ["BotApiStandIn", "NOT_FOUND"]


