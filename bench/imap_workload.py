"""The mailbox of the IMAP benchmark (``bench/imap.py``): N realistic French health mails,
generated deterministically from a seed, identical bytes for the gateway and for Dovecot.

Each message is 2-20 KB (log-uniform), CRLF line endings, realistic headers (Received,
DKIM-Signature, RFC 2047 encoded subjects and names, Message-ID, some In-Reply-To/References
threads, varied dates over two years). About 55 % are a single ``text/plain`` part (8bit or
quoted-printable), 15 % ``multipart/alternative`` (text + HTML), 30 % ``multipart/mixed`` with
a small PDF-like attachment (base64). About 70 % carry ``\\Seen``.

The search terms used by the load (``FROM_TERMS``, ``SUBJECT_TERMS``) are plain ASCII words
that occur in a fraction of the messages.
"""

from __future__ import annotations

import base64
import quopri
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

PATIENT_DOMAIN = "patient.mssante.fr"

SENDERS: tuple[tuple[str, str], ...] = (
    ("Dr Marie Chanteau", "marie.chanteau@medecin.mssante.fr"),
    ("Christelle Thomas", "christelle.thomas@medecin.mssante.fr"),
    ("Docteur Dupond", "paul.dupond@ch-exemple.mssante.fr"),
    ("Labo BioPCR Orly", "resultats@labo-biopcr-orly.mssante.fr"),
    ("Secrétariat Cardiologie", "secretariat.cardio@chu-nantes.mssante.fr"),
    ("Dr Hélène Lefèvre", "helene.lefevre@medecin.mssante.fr"),
    ("Cabinet de radiologie Pasteur", "accueil@radiologie-pasteur.mssante.fr"),
    ("Dr Jérôme Garnier", "jerome.garnier@pediatre.mssante.fr"),
    ("Pharmacie du Marché", "contact@pharmacie-du-marche.mssante.fr"),
    ("Service d'endocrinologie", "endocrino@ch-lyon-sud.mssante.fr"),
    ("Dr Amélie Rousseau", "amelie.rousseau@dermatologue.mssante.fr"),
    ("Kinésithérapie Saint-Michel", "kine.stmichel@paramedical.mssante.fr"),
)

#: FROM search terms (each matches one or two senders).
FROM_TERMS = ("chanteau", "dupond", "labo", "radiologie", "garnier", "endocrino")
#: SUBJECT search terms (ASCII, so no CHARSET is needed).
SUBJECT_TERMS = ("consultation", "ordonnance", "analyses", "rendez-vous", "compte rendu",
                 "vaccination")

SUBJECTS = (
    "Résultats d'analyses du {d}",
    "Compte rendu de consultation",
    "Votre rendez-vous du {d}",
    "Ordonnance renouvelée",
    "Compte rendu d'imagerie — échographie abdominale",
    "Bilan sanguin : résultats disponibles",
    "Suivi post-opératoire",
    "Rappel de vaccination",
    "Lettre de liaison de sortie d'hospitalisation",
    "Questionnaire pré-anesthésique",
    "Consultation de contrôle",
    "Résultats de votre IRM",
    "Prise en charge kinésithérapie : ordonnance",
    "Demande de pièces complémentaires",
    "Analyses de contrôle (HbA1c)",
)

PARAGRAPHS = (
    "Madame, Monsieur,",
    "Je vous prie de trouver ci-joint les résultats de vos analyses biologiques réalisées "
    "au laboratoire. Les valeurs de la numération formule sanguine sont dans les normes ; "
    "la ferritine est légèrement abaissée, ce qui justifie une supplémentation martiale "
    "pendant trois mois.",
    "Suite à notre consultation, je vous confirme la poursuite du traitement actuel. Merci de "
    "prendre rendez-vous pour un contrôle dans six semaines, à jeun, au laboratoire de votre "
    "choix, avec l'ordonnance jointe.",
    "L'échographie abdominale ne montre pas d'anomalie hépatique. La vésicule biliaire est "
    "alithiasique, les voies biliaires ne sont pas dilatées. Le pancréas est vu en partie, "
    "sans particularité. Les reins sont de taille normale et bien différenciés.",
    "Votre rendez-vous est confirmé au service de cardiologie, bâtiment B, 2e étage. Merci "
    "de vous présenter quinze minutes avant l'heure prévue muni de votre carte Vitale, de "
    "votre pièce d'identité et de vos derniers examens.",
    "Le bilan lipidique montre un LDL-cholestérol à 1,32 g/L, au-dessus de l'objectif fixé. "
    "Nous en reparlerons lors de la prochaine consultation ; d'ici là, poursuivez les "
    "mesures hygiéno-diététiques et l'activité physique régulière.",
    "Je vous rappelle que la vaccination contre la grippe saisonnière est recommandée pour "
    "les personnes atteintes de maladies chroniques. Elle peut être réalisée en pharmacie, "
    "par votre médecin traitant ou par un infirmier.",
    "Conformément à la réglementation, ce message est transmis par la messagerie sécurisée "
    "de santé. Il ne doit pas être transféré à un tiers sans votre accord.",
    "Les suites opératoires sont simples. La cicatrice est propre, sans signe "
    "d'inflammation. Les fils seront retirés par l'infirmière à domicile à J10. Reprise "
    "progressive des activités, pas de port de charges lourdes pendant un mois.",
    "Hémoglobine glyquée (HbA1c) : 6,8 %. Glycémie à jeun : 1,12 g/L. Créatininémie : "
    "78 µmol/L, DFG estimé > 90 mL/min/1,73 m². Microalbuminurie négative.",
    "Je reste à votre disposition pour tout renseignement complémentaire.",
    "Bien cordialement,",
    "Merci de nous retourner le questionnaire complété avant la consultation d'anesthésie. "
    "En cas de traitement anticoagulant, signalez-le impérativement.",
    "Le compte rendu détaillé a été adressé à votre médecin traitant. Une copie figure en "
    "pièce jointe au format PDF.",
)

USER_AGENTS = ("Mozilla Thunderbird 115.6", "Microsoft Outlook 16.0", "MSSanté Webmail 4.2",
               "Apicrypt 2 / MSSanté connecteur 3.1", "Weda 2.9 MSSanté")


@dataclass(frozen=True, slots=True)
class BenchMessage:
    raw: bytes  # CRLF line endings, as stored by the gateway and served by Dovecot
    date: datetime  # Date: and internal date
    seen: bool


def _wrap(text: str, width: int = 76) -> list[str]:
    lines: list[str] = []
    line = ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line:
        lines.append(line)
    return lines


_WRAPPED = tuple(("\r\n".join(_wrap(p)) + "\r\n", len(p.encode()) + 6) for p in PARAGRAPHS)


def _text(rng: random.Random, size: int) -> str:
    out: list[str] = [PARAGRAPHS[0], ""]
    total = 40
    while total < size:
        para, length = _WRAPPED[rng.randrange(1, len(_WRAPPED))]
        out.append(para)
        total += length
    out += ["Bien cordialement,", "", "--", "Message envoyé via la messagerie sécurisée de santé"]
    return "\r\n".join(out) + "\r\n"


def _encode_text(rng: random.Random, text: str) -> tuple[str, bytes]:
    if rng.random() < 0.6:
        body = quopri.encodestring(text.encode(), quotetabs=False)
        return "quoted-printable", body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return "8bit", text.encode()


def _b64_lines(data: bytes) -> bytes:
    encoded = base64.b64encode(data)
    return b"\r\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76)) + b"\r\n"


def _pdf_like(rng: random.Random, size: int) -> bytes:
    head = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\n"
    tail = b"\nxref\n0 3\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n"
    return head + rng.randbytes(max(0, size - len(head) - len(tail))) + tail


def _header(value: str) -> str:
    """RFC 2047 B-encoding in words of at most 45 bytes (whole characters), folded."""
    if value.isascii():
        return value
    words: list[str] = []
    chunk = b""
    for char in value:
        encoded = char.encode()
        if len(chunk) + len(encoded) > 45:
            words.append(chunk.decode())
            chunk = b""
        chunk += encoded
    words.append(chunk.decode())
    return "\r\n ".join(f"=?UTF-8?B?{base64.b64encode(w.encode()).decode()}?=" for w in words)


def content(rng: random.Random, budget: int) -> tuple[list[str], bytes]:
    """Content headers and a body of about ``budget`` bytes: 55 % text/plain (8bit or
    quoted-printable), 15 % text + HTML, 30 % text + a PDF-like attachment."""
    kind = rng.random()
    if kind < 0.55:
        cte, body = _encode_text(rng, _text(rng, budget * 10 // 11))
        return (["Content-Type: text/plain; charset=utf-8; format=flowed",
                 f"Content-Transfer-Encoding: {cte}"], body)
    boundary = f"----=_Part_{rng.getrandbits(64):016x}"
    parts: list[bytes] = []
    if kind < 0.70:
        text = _text(rng, budget * 2 // 5)
        cte, tbody = _encode_text(rng, text)
        html = "<html><body>" + "".join(
            f"<p>{line}</p>\r\n" for line in text.split("\r\n\r\n") if line) + "</body></html>"
        hcte, hbody = _encode_text(rng, html)
        parts.append(f"Content-Type: text/plain; charset=utf-8\r\n"
                     f"Content-Transfer-Encoding: {cte}\r\n\r\n".encode() + tbody)
        parts.append(f"Content-Type: text/html; charset=utf-8\r\n"
                     f"Content-Transfer-Encoding: {hcte}\r\n\r\n".encode() + hbody)
        content_type = f'Content-Type: multipart/alternative; boundary="{boundary}"'
    else:
        pdf_size = rng.randrange(900, max(1000, budget // 2))
        cte, tbody = _encode_text(rng, _text(rng, budget - pdf_size * 4 // 3 - 400))
        filename = rng.choice(("compte-rendu.pdf", "resultats_analyses.pdf", "ordonnance.pdf",
                               "courrier_liaison.pdf"))
        parts.append(f"Content-Type: text/plain; charset=utf-8\r\n"
                     f"Content-Transfer-Encoding: {cte}\r\n\r\n".encode() + tbody)
        parts.append(f'Content-Type: application/pdf; name="{filename}"\r\n'
                     f'Content-Disposition: attachment; filename="{filename}"\r\n'
                     f"Content-Transfer-Encoding: base64\r\n\r\n".encode()
                     + _b64_lines(_pdf_like(rng, pdf_size)))
        content_type = f'Content-Type: multipart/mixed; boundary="{boundary}"'
    sep = f"--{boundary}\r\n".encode()
    body = (b"This is a multi-part message in MIME format.\r\n\r\n"
            + b"".join(sep + p + b"\r\n" for p in parts) + f"--{boundary}--\r\n".encode())
    return [content_type], body


def make_message(rng: random.Random, seq: int, now: datetime, tag: str = "m") -> BenchMessage:
    """One message; ``seq`` and ``tag`` make the Message-ID unique."""
    name, address = SENDERS[rng.randrange(len(SENDERS))]
    date = now - timedelta(seconds=rng.randrange(2 * 365 * 86400))
    size = int(2048 * (10 ** rng.random()))  # 2 KB .. 20 KB, log-uniform
    subject = rng.choice(SUBJECTS).format(d=date.strftime("%d/%m/%Y"))
    if rng.random() < 0.2:
        subject = "RE: " + subject
    domain = address.split("@", 1)[1]
    message_id = f"<{tag}{seq}.{rng.getrandbits(48):012x}@{domain}>"
    recipient = f"289057512345621@{PATIENT_DOMAIN}"
    headers = [
        f"Return-Path: <{address}>",
        f"Received: from mx.{domain} (mx.{domain} [10.{seq % 250}.{rng.randrange(250)}.7])\r\n"
        f"\tby mssante.bench.test with ESMTPS id {rng.getrandbits(40):010X}\r\n"
        f"\tfor <{recipient}>; {format_datetime(date)}",
        f"Received: from poste-{rng.randrange(1, 60)}.{domain} ([192.168.{rng.randrange(255)}"
        f".{rng.randrange(255)}])\r\n\tby mx.{domain} with ESMTPSA; {format_datetime(date)}",
        f"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d={domain}; s=mssante;\r\n"
        f"\tt={int(date.timestamp())}; h=from:to:subject:date:message-id;\r\n"
        f"\tbh={base64.b64encode(rng.randbytes(32)).decode()};\r\n"
        f"\tb={base64.b64encode(rng.randbytes(96)).decode()}",
        f"Date: {format_datetime(date)}",
        f"From: {_header(name)} <{address}>",
        f"To: Inaya Michel <{recipient}>",
        f"Subject: {_header(subject)}",
        f"Message-ID: {message_id}",
    ]
    if subject.startswith("RE: "):
        ref = f"<{tag}{max(0, seq - rng.randrange(1, 50))}.thread@{domain}>"
        headers += [f"In-Reply-To: {ref}", f"References: {ref}"]
    headers += ["MIME-Version: 1.0", f"User-Agent: {rng.choice(USER_AGENTS)}"]
    content_headers, body = content(rng, max(300, size - 1500))  # headers: ~1.5 KB
    headers += content_headers
    raw = "\r\n".join(headers).encode() + b"\r\n\r\n" + body
    return BenchMessage(raw, date, rng.random() < 0.7)


#: A fixed "now" so the generated bytes never depend on the day the benchmark runs.
EPOCH = datetime(2025, 6, 1, 9, 0, tzinfo=UTC)


def make_mailbox(n: int, seed: int = 20250601) -> list[BenchMessage]:
    rng = random.Random(seed)
    return [make_message(rng, i, EPOCH) for i in range(n)]


if __name__ == "__main__":
    import statistics
    import sys
    import time

    t0 = time.perf_counter()
    box = make_mailbox(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)
    sizes = [len(m.raw) for m in box]
    print(f"{len(box)} messages in {time.perf_counter() - t0:.2f}s, "
          f"{sum(sizes) / 1e6:.1f} MB, median {statistics.median(sizes)} B, "
          f"min {min(sizes)} max {max(sizes)}, seen {sum(m.seen for m in box)}")
    sys.stdout.buffer.write(box[int(sys.argv[2]) if len(sys.argv) > 2 else 3].raw)
