"""The patient portal (SPEC §11): an ASGI application run in the gateway's event loop, over the
same store, rules and queue as SMTP and IMAP. Server-rendered French pages that work without
JavaScript; static files; security headers on every response."""
