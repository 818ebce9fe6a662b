#!/usr/bin/env bash
# Make a private CA and a server certificate for the fedpersona SuperLink (TLS), with openssl.
#
#   docker/certs.sh OUT_DIR [NAME ...]
#
# OUT_DIR gets: ca.crt (give it to every client: --root-certificates), ca.key (keep it offline),
# server.pem and server.key (the server's: fedpersona server --certificates OUT_DIR).
# The server certificate is valid for localhost, 127.0.0.1, ::1, the Compose service name
# "superlink", and every NAME given (host names or IP addresses clients use to reach the server).
# Keys are ECDSA P-256 (fast, supported by Python's ssl, httpx and uvicorn); CERT_KEY=rsa makes
# RSA 4096 keys instead. CERT_DAYS sets the validity (default 825 days).
# It refuses to overwrite an existing CA: delete OUT_DIR to start over.
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
out="$1"; shift
command -v openssl >/dev/null || { echo "certs.sh: openssl not found; install it (apt-get install openssl)" >&2; exit 2; }
if [[ -e "$out/ca.crt" ]]; then
  echo "certs.sh: $out/ca.crt exists; delete $out to make new certificates" >&2
  exit 2
fi
mkdir -p "$out"
umask 077

sans="DNS:localhost,IP:127.0.0.1,IP:::1,DNS:superlink"
for name in "$@"; do
  if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then sans="$sans,IP:$name"; else sans="$sans,DNS:$name"; fi
done
days="${CERT_DAYS:-825}"
if [[ "${CERT_KEY:-ec}" == "rsa" ]]; then newkey=(-newkey rsa:4096); else newkey=(-newkey ec -pkeyopt ec_paramgen_curve:P-256); fi

openssl req -x509 "${newkey[@]}" -sha256 -nodes -days "$days" \
  -keyout "$out/ca.key" -out "$out/ca.crt" -subj "/CN=fedpersona private CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

openssl req "${newkey[@]}" -sha256 -nodes -keyout "$out/server.key" -out "$out/server.csr" \
  -subj "/CN=fedpersona superlink" 2>/dev/null

cat > "$out/server.ext" <<EXT
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$sans
EXT
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
  -out "$out/server.pem" -days "$days" -sha256 -extfile "$out/server.ext" 2>/dev/null
rm -f "$out/server.csr" "$out/server.ext" "$out/ca.srl"
chmod 644 "$out/ca.crt" "$out/server.pem"
chmod 600 "$out/ca.key" "$out/server.key"

openssl verify -CAfile "$out/ca.crt" "$out/server.pem" >/dev/null
echo "certs.sh: wrote $out/{ca.crt,ca.key,server.pem,server.key} for $sans"
