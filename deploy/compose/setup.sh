#!/usr/bin/env bash
# Once, before the first `docker compose up -d` (docs/install.md): `./setup.sh <community>` makes
# .env with fresh secrets, the Prometheus token file, an inventory if there is none, and the
# Mosquitto accounts and ACL (with the gateway image's `cgw mqtt-auth`), a TLS certificate for
# Mosquitto's device listener when there is none (mosquitto-certs/: replace it with your own,
# same names), and InfluxDB tokens that may only write (the gateway) or only read (Grafana) the
# bucket. Running it again keeps every existing secret and password; run it after changing
# inventory.yaml.
set -euo pipefail
cd "$(dirname "$0")"
community=${1:-}

random() { head -c 48 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 32; }
set_once() {  # KEY VALUE: set KEY in .env unless it has a value already
    if ! grep -q "^$1=" .env; then
        echo "$1=$2" >>.env  # an .env from an older setup.sh lacks the line
    elif ! grep -q "^$1=." .env; then
        sed -i "s|^$1=.*|$1=$2|" .env
    fi
}

if [ ! -f .env ]; then
    cp .env.example .env
    [ -z "$community" ] || sed -i "s|^COMMUNITY=.*|COMMUNITY=$community|" .env
fi
for key in INFLUX_ADMIN_PASSWORD INFLUX_TOKEN GRAFANA_ADMIN_PASSWORD OPERATOR_TOKEN METRICS_TOKEN MQTT_PASSWORD; do
    set_once "$key" "$(random)"
done
chmod 600 .env
value() { grep "^$1=" .env | cut -d= -f2-; }

(umask 077 && mkdir -p secrets)
# Mosquitto's user (1883 in its container) may pass through these, and read only its own files.
mkdir -p mosquitto-auth mosquitto-certs && chmod 0711 mosquitto-auth mosquitto-certs
(umask 077 && value METRICS_TOKEN | tr -d '\n' >secrets/metrics-token)
[ -f inventory.yaml ] || cp ../inventory.example.yaml inventory.yaml
# The gateway's account gets the password .env already holds: mqtt-auth keeps known passwords.
if [ ! -f mosquitto-auth/credentials.csv ]; then
    (umask 077 && printf 'username,password\ncgw-gateway,%s\n' "$(value MQTT_PASSWORD)" >mosquitto-auth/credentials.csv)
fi

# A private CA and a server certificate for the TLS listener; devices trust mosquitto-certs/ca.crt.
if [ ! -f mosquitto-certs/server.crt ]; then
    host=$(hostname)
    (
        umask 077
        cd mosquitto-certs
        openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=cgw community CA" \
            -keyout ca.key -out ca.crt 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -subj "/CN=$host" -keyout server.key -out server.csr 2>/dev/null
        printf 'subjectAltName=DNS:%s,DNS:localhost,IP:127.0.0.1\n' "$host" >server.ext
        openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 \
            -extfile server.ext -out server.crt 2>/dev/null
        rm -f server.csr server.ext
        chmod 0644 ca.crt server.crt
    )
fi

docker compose build gateway
# As root in the container, so the files can be given to Mosquitto's user (1883) and to you.
docker compose run --rm --no-deps --user 0 -v "$PWD/mosquitto-auth:/out" -v "$PWD/mosquitto-certs:/certs" \
    --entrypoint sh gateway -c \
    "cgw mqtt-auth --inventory /etc/cgw/inventory.yaml --out /out \
     && chmod 0711 /out && chown 1883:1883 /out/passwd /out/acl /certs/server.key \
     && chown $(id -u):$(id -g) /out/credentials.csv"

# InfluxDB's own set-up makes the admin token; the gateway and Grafana get narrower ones.
influx() { docker compose exec -T influxdb influx "$@" --host http://localhost:8086 --token "$(value INFLUX_TOKEN)"; }
if [ -z "$(value INFLUX_WRITE_TOKEN)" ] || [ -z "$(value INFLUX_READ_TOKEN)" ]; then
    docker compose up -d influxdb
    for _ in $(seq 60); do
        docker compose exec -T influxdb influx ping --host http://localhost:8086 >/dev/null 2>&1 && break
        sleep 1
    done
    org=$(value INFLUX_ORG)
    bucket_id=$(influx bucket list --org "$org" --name "$(value INFLUX_BUCKET)" --hide-headers | cut -f1)
    [ -n "$bucket_id" ] || { echo "error: InfluxDB has no bucket $(value INFLUX_BUCKET)" >&2; exit 1; }
    token_of() { sed -n 's/.*"token": *"\([^"]*\)".*/\1/p' | head -n 1; }
    set_once INFLUX_WRITE_TOKEN "$(influx auth create --org "$org" --write-bucket "$bucket_id" \
        --description "cgw gateway: write $(value INFLUX_BUCKET) only" --json | token_of)"
    set_once INFLUX_READ_TOKEN "$(influx auth create --org "$org" --read-bucket "$bucket_id" \
        --description "Grafana: read $(value INFLUX_BUCKET) only" --json | token_of)"
fi

echo "ready: docker compose up -d"
echo "  dashboard  http://localhost:8080/dashboard/ (operator token: OPERATOR_TOKEN in .env)"
echo "  grafana    http://localhost:3000 (admin / GRAFANA_ADMIN_PASSWORD in .env)"
echo "  devices    accounts in mosquitto-auth/credentials.csv; MQTT over TLS on port 8883, CA mosquitto-certs/ca.crt"
