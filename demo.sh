#!/usr/bin/env bash
# Sets up and runs the gateway on its embedded default: SQLite, dev certificates, a demo
# professional and a demo patient. Everything lives in ./demo (delete it to start over).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
install_log=.venv/install.log
if ! { .venv/bin/python -m pip install --quiet --upgrade pip \
       && .venv/bin/python -m pip install --quiet -e .; } >"$install_log" 2>&1; then
  tail -20 "$install_log" >&2
  echo "installation failed (full log: $install_log)" >&2
  exit 1
fi
export PATH="$PWD/.venv/bin:$PATH"
export MSSANTE_CONFIG="$PWD/demo/gateway.toml"

PRO=marie.chanteau@medecin.mssante.fr
PRO_PASSWORD=demo-professionnel
INS=289057512345621
PATIENT_PASSWORD=demo-patient

if [ ! -f demo/.ready ]; then
  rm -rf demo  # a set-up that did not finish is started again
  mssante-gateway init --dir demo --domain mssante.example
  mssante-policy domain import tests/samples/whitelist.xml
  echo "$PRO_PASSWORD" | mssante-policy professional add "$PRO" --name "Dr Marie Chanteau" \
    --rpps 10001234567 --password-stdin
  mssante-gateway certs professional "$PRO" --out demo/certs/professional
  echo "$PATIENT_PASSWORD" | mssante-policy patient add "$INS" --name "Inaya Michel" \
    --notify-email inaya.michel@example.org --phone "+33612345678" --password-stdin
  touch demo/.ready
fi

cat <<INFO

Demo gateway (config: demo/gateway.toml, data: demo/gateway.db)
  professional  $PRO  password: $PRO_PASSWORD
                client certificate: demo/certs/professional/{cert,key}.pem
  patient       $INS@patient.mssante.fr (or login $INS)  password: $PATIENT_PASSWORD
  trust CA      demo/certs/ca.pem

  Patient portal  https://localhost:8443/  (the dev certificate: trust demo/certs/ca.pem or
                  accept the warning). Log in with $INS and $PATIENT_PASSWORD, choose
                  "Par SMS": the one-time code is written to demo/sms-outbox.txt

  SMTP intake   127.0.0.1:2525 (STARTTLS)   submission 127.0.0.1:5870 (STARTTLS)
  submissions   127.0.0.1:4650 (TLS)        IMAP 127.0.0.1:1143 (STARTTLS), IMAPS 127.0.0.1:9930

Send a message as the professional (another terminal):
  swaks --server 127.0.0.1:2525 --tls --tls-ca-path demo/certs/ca.pem \\
        --tls-cert demo/certs/professional/cert.pem --tls-key demo/certs/professional/key.pem \\
        --from $PRO --to $INS@patient.mssante.fr \\
        --header "From: $PRO" --header "Subject: Bonjour"
Admin:  MSSANTE_CONFIG=demo/gateway.toml .venv/bin/mssante-policy patient show $INS

INFO
exec mssante-gateway serve
