"""Fuzz harnesses for the parsers that read hostile input (issue 16).

One module per parser, each exposing ``HARNESS`` (:class:`fuzz.common.Harness`):

* :mod:`fuzz.imap_parser` - the IMAP command parser, whole and in random chunks;
* :mod:`fuzz.smtp_data` - the SMTP DATA reader against a line-by-line reference model;
* :mod:`fuzz.mime` - the MIME analysis (seeded with ``tests/samples/``);
* :mod:`fuzz.identities` - addresses, domains, INS, RPPS, phone numbers, patient logins;
* :mod:`fuzz.documents` - the portal's uploads: content sniffing (pypdf), names, dates, profile
  entries.

Run them with ``python -m fuzz.run`` (see its ``--help``). The package is a tool beside the
product: the product never imports it.
"""
