#!/usr/bin/env bash
# Sets up and runs the gateway on its embedded default: SQLite, dev certificates, a demo
# professional, a demo patient, and a demo "professionals' operator" for medecin.mssante.fr
# that prints the patients' replies the gateway relays to it. Everything lives in ./demo
# (delete it to start over).
#
# Environment (all optional): DEMO_DIR (default ./demo); DEMO_PORT_BASE: use seven ports from
# there instead of the dev ports (SMTP, submission, submissions, IMAP, IMAPS, portal, demo
# operator); DEMO_SKIP_INSTALL=1: use .venv as it is (no pip run).
set -euo pipefail
cd "$(dirname "$0")"
. deploy/venv.sh
stamp=.venv/.demo-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "${DEMO_SKIP_INSTALL:-}" != 1 ] && [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  venv_install .
  echo "$want" >"$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
DEMO_DIR=${DEMO_DIR:-demo}
export MSSANTE_CONFIG="$DEMO_DIR/gateway.toml"

if [ -n "${DEMO_PORT_BASE:-}" ]; then
  b=$DEMO_PORT_BASE
  SMTP=$b SUBMISSION=$((b + 1)) SUBMISSIONS=$((b + 2)) IMAP=$((b + 3)) IMAPS=$((b + 4))
  WEB=$((b + 5)) OPERATOR=$((b + 6))
else
  SMTP=2525 SUBMISSION=5870 SUBMISSIONS=4650 IMAP=1143 IMAPS=9930 WEB=8443 OPERATOR=2626
fi

PRO=marie.chanteau@medecin.mssante.fr
PRO_PASSWORD=demo-professionnel
INS=289057512345621
PATIENT=$INS@patient.mssante.fr
PATIENT_PASSWORD=demo-patient
HOST=localhost  # a name the dev certificate carries and every client checks (not an IP)

if [ ! -f "$DEMO_DIR/.ready" ]; then
  # A set-up that did not finish is started again; never remove a folder that is not ours.
  if [ -d "$DEMO_DIR" ] && [ -n "$(ls -A "$DEMO_DIR")" ] && [ ! -f "$DEMO_DIR/gateway.toml" ]
  then
    echo "$DEMO_DIR exists and is not a demo folder: choose another DEMO_DIR" >&2
    exit 2
  fi
  rm -rf "$DEMO_DIR"
  mssante-gateway init --dir "$DEMO_DIR" --domain mssante.example
  mssante-policy domain import tests/samples/whitelist.xml
  echo "$PRO_PASSWORD" | mssante-policy professional add "$PRO" --name "Dr Marie Chanteau" \
    --rpps 10001234565 --password-stdin
  mssante-gateway certs professional "$PRO" --out "$DEMO_DIR/certs/professional"
  # The operator of medecin.mssante.fr: its server certificate names its domain, and the
  # gateway relays the domain's mail to it (a route to an IP address: the certificate must
  # name the recipient's domain).
  mssante-gateway certs operator medecin.mssante.fr --out "$DEMO_DIR/certs/operator"
  echo "$PATIENT_PASSWORD" | mssante-policy patient add "$INS" --name "Inaya Michel" \
    --notify-email inaya.michel@example.org --phone "+33612345678" --password-stdin
  touch "$DEMO_DIR/.ready"
fi

# Ports and the route to the demo operator (rewritten at each start: DEMO_PORT_BASE may change).
"$PWD/.venv/bin/python" - "$MSSANTE_CONFIG" "$SMTP" "$SUBMISSION" "$SUBMISSIONS" "$IMAP" \
  "$IMAPS" "$WEB" "$OPERATOR" <<'PY'
import re, sys
path, *ports = sys.argv[1:]
text = open(path, encoding="utf-8").read()
for name, port in zip(("smtp", "submission", "submissions", "imap", "imaps", "web"), ports):
    text, n = re.subn(rf'(?m)^(\[{name}\]\nlisten = )"[^"]*"', rf'\g<1>"127.0.0.1:{port}"', text)
    assert n == 1, name
route = f'"medecin.mssante.fr" = "127.0.0.1:{ports[6]}"  # the demo operator'
text, n = re.subn(r'(?m)^(# )?"medecin\.mssante\.fr" = .*$', route, text)
assert n == 1, "[outbound.routes]"
open(path, "w", encoding="utf-8").write(text)
PY

# Ready-made settings for two mail clients, the same as printed below.
abs=$(cd "$DEMO_DIR" && pwd)
cat >"$DEMO_DIR/mbsyncrc" <<MBSYNC
# mbsync -c $abs/mbsyncrc -a   (isync >= 1.4): the patient's mailboxes into $abs/maildir
IMAPAccount patient
Host $HOST
Port $IMAPS
SSLType IMAPS
CertificateFile $abs/certs/ca.pem
User $INS
Pass $PATIENT_PASSWORD

IMAPStore patient-remote
Account patient

MaildirStore patient-local
Path $abs/maildir/
Inbox $abs/maildir/INBOX
SubFolders Verbatim

Channel patient
Far :patient-remote:
Near :patient-local:
Patterns *
Create Near
SyncState *
MBSYNC
mkdir -p "$DEMO_DIR/maildir"
cat >"$DEMO_DIR/neomuttrc" <<NEOMUTT
# neomutt -F $abs/neomuttrc
set ssl_ca_certificates_file = "$abs/certs/ca.pem"
set ssl_force_tls = yes
set folder = "imaps://$INS@$HOST:$IMAPS/"
set imap_pass = "$PATIENT_PASSWORD"
set spoolfile = "+INBOX"
set postponed = "+Drafts"
set trash = "+Trash"
set record = ""   # the gateway files what you send in Sent itself (no second copy)
set from = "Inaya Michel <$PATIENT>"
set smtp_url = "smtps://$INS@$HOST:$SUBMISSIONS/"
set smtp_pass = "$PATIENT_PASSWORD"
NEOMUTT

cat <<INFO

Demo gateway (config: $DEMO_DIR/gateway.toml, data: $DEMO_DIR/gateway.db)
  professional  $PRO  password: $PRO_PASSWORD
                client certificate: $DEMO_DIR/certs/professional/{cert,key}.pem
  patient       $PATIENT (or login $INS)  password: $PATIENT_PASSWORD
  trust CA      $DEMO_DIR/certs/ca.pem  (the certificate names $HOST: connect to $HOST)

  Patient portal  https://$HOST:$WEB/  (trust $DEMO_DIR/certs/ca.pem or accept the warning).
                  Log in with $INS and $PATIENT_PASSWORD, choose "Par SMS": the one-time
                  code is written to $DEMO_DIR/sms-outbox.txt

  SMTP intake   $HOST:$SMTP (STARTTLS)   submission $HOST:$SUBMISSION (STARTTLS)
  submissions   $HOST:$SUBMISSIONS (TLS)        IMAP $HOST:$IMAP (STARTTLS), IMAPS $HOST:$IMAPS
  demo operator 127.0.0.1:$OPERATOR: the operator of medecin.mssante.fr; the patient's replies
                to $PRO are relayed there and printed below

1. Write to the patient as the professional (another terminal):
  swaks --server $HOST:$SMTP --tls --tls-ca-path $DEMO_DIR/certs/ca.pem \\
        --tls-cert $DEMO_DIR/certs/professional/cert.pem \\
        --tls-key $DEMO_DIR/certs/professional/key.pem \\
        --from $PRO --to $PATIENT \\
        --header "From: Dr Marie Chanteau <$PRO>" --header "Subject: Bonjour"
2. Read and answer it as the patient: the portal, or a mail client with
     IMAP  $HOST port $IMAPS, TLS (or port $IMAP, STARTTLS), user $INS
     SMTP  $HOST port $SUBMISSIONS, TLS (or port $SUBMISSION, STARTTLS), same user and password
     CA    $DEMO_DIR/certs/ca.pem
   Ready-made: mbsync -c $DEMO_DIR/mbsyncrc -a    neomutt -F $DEMO_DIR/neomuttrc
   (the gateway files what the patient sends in Sent; a client's own copy is not kept twice)
3. The reply appears below, printed by the demo operator.

Admin:  MSSANTE_CONFIG=$DEMO_DIR/gateway.toml .venv/bin/mssante-policy patient show $INS

INFO

mssante-gateway demo-operator --listen "127.0.0.1:$OPERATOR" \
  --cert-dir "$DEMO_DIR/certs/operator" &
operator=$!
trap 'kill "$operator" 2>/dev/null || true' EXIT
mssante-gateway serve
