"""A small browser stand-in for the portal tests: urllib over HTTPS with the dev CA, a cookie
jar, the forms' CSRF tokens read from the pages (test helper)."""

from __future__ import annotations

import html
import re
import ssl
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from http.cookiejar import CookieJar
from pathlib import Path
from urllib.parse import urlencode

from tests.gateway_proc import Gateway


@dataclass
class Reply:
    status: int
    url: str
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        """The page with HTML character references resolved (``&#39;`` reads ``'``)."""
        return html.unescape(self.body.decode("utf-8", "replace"))

    def csrf(self) -> str:
        match = re.search(r'name="csrf" value="([^"]+)"', self.text)
        assert match, self.text[:2000]
        return match.group(1)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


class PortalClient:
    def __init__(self, gw: Gateway, follow: bool = True) -> None:
        self.base = f"https://localhost:{gw.ports['web']}"
        self.gw = gw
        self.jar = CookieJar()
        ctx = ssl.create_default_context(cafile=str(gw.ca))
        handlers: list[urllib.request.BaseHandler] = [
            urllib.request.HTTPSHandler(context=ctx),
            urllib.request.HTTPCookieProcessor(self.jar)]
        if not follow:
            handlers.append(_NoRedirect())
        self.opener = urllib.request.build_opener(*handlers)

    def request(self, path: str, data: bytes | None = None,
                headers: dict[str, str] | None = None) -> Reply:
        req = urllib.request.Request(self.base + path, data=data, headers=headers or {})
        try:
            with self.opener.open(req, timeout=30) as resp:
                return Reply(resp.status, resp.url, {k.lower(): v for k, v in resp.headers.items()},
                             resp.read())
        except urllib.error.HTTPError as err:
            return Reply(err.code, err.url or path,
                         {k.lower(): v for k, v in err.headers.items()}, err.read())

    def get(self, path: str) -> Reply:
        return self.request(path)

    def post(self, path: str, fields: dict[str, str | list[str]]) -> Reply:
        return self.request(path, urlencode(fields, doseq=True).encode(),
                            {"Content-Type": "application/x-www-form-urlencoded"})

    def post_multipart(self, path: str, fields: dict[str, str | list[str]],
                       files: list[tuple[str, str, str, bytes]]) -> Reply:
        boundary = uuid.uuid4().hex
        parts: list[bytes] = []
        for name, value in fields.items():
            for v in value if isinstance(value, list) else [value]:
                parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'
                             f'\r\n\r\n{v}\r\n'.encode())
        for name, filename, media, data in files:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                         f'filename="{filename}"\r\nContent-Type: {media}\r\n\r\n'.encode()
                         + data + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        return self.request(path, body,
                            {"Content-Type": f"multipart/form-data; boundary={boundary}"})

    def last_sms_code(self) -> str:
        outbox = Path(self.gw.directory) / "sms-outbox.txt"
        codes = re.findall(r"code de connexion est (\d{6})", outbox.read_text("utf-8"))
        assert codes, "no code in the SMS outbox"
        return codes[-1]

    def login(self, identifier: str, password: str) -> Reply:
        """The whole walkthrough: password, the code by SMS, the code."""
        page = self.get("/connexion")
        page = self.post("/connexion", {"csrf": page.csrf(), "identifiant": identifier,
                                        "mot_de_passe": password})
        assert page.url.endswith("/connexion/code"), (page.status, page.url)
        page = self.post("/connexion/code", {"csrf": page.csrf(), "canal": "sms"})
        assert page.url.endswith("/connexion/code/saisie"), (page.status, page.text[:500])
        return self.post("/connexion/code/saisie", {"csrf": page.csrf(),
                                                    "code": self.last_sms_code()})
