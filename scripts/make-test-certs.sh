#!/usr/bin/env bash
# Makes throwaway certificates for trying the TLS examples (examples/https.toml, mtls.toml,
# tls-upstream.toml): a CA, server certificates for api.example.test and admin.example.test
# (and 127.0.0.1), and a client certificate whose identity is
# spiffe://example.test/ns/admin/sa/tester. Writes them to DIR (default examples/certs).
# Needs openssl. Not for production: use your cluster's CA (cert-manager, SPIFFE).
set -euo pipefail
DIR=${1:-"$(dirname "$0")/../examples/certs"}
mkdir -p "$DIR"
cd "$DIR"
ec() { openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out "$1"; }
ec ca-key.pem
openssl req -x509 -new -key ca-key.pem -days 30 -subj "/CN=Fulcrum example CA" -out ca.pem
leaf() { # name subject SANs extendedKeyUsage
  ec "$1-key.pem"
  openssl req -new -key "$1-key.pem" -subj "$2" -out "$1.csr"
  printf 'subjectAltName=%s\nextendedKeyUsage=%s\n' "$3" "$4" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 30 \
    -extfile "$1.ext" -out "$1.pem" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
leaf api "/CN=api.example.test" "DNS:api.example.test,IP:127.0.0.1" serverAuth
leaf admin "/CN=admin.example.test" "DNS:admin.example.test" serverAuth
leaf client "/CN=tester" "URI:spiffe://example.test/ns/admin/sa/tester" clientAuth
echo "certificates in $DIR: ca.pem, api.pem, admin.pem, client.pem (and their -key.pem)"
