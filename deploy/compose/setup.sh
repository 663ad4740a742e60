#!/usr/bin/env bash
# Once, before the first `docker compose up -d` (docs/install.md): `./setup.sh <community>` makes
# .env with fresh secrets, the Prometheus token file, an inventory if there is none, and the
# Mosquitto accounts and ACL (with the gateway image's `cgw mqtt-auth`). Running it again keeps
# every existing secret and password; run it after changing inventory.yaml.
set -euo pipefail
cd "$(dirname "$0")"
community=${1:-}

random() { head -c 48 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 32; }
set_once() {  # KEY VALUE: set KEY in .env unless it has a value already
    grep -q "^$1=." .env || sed -i "s|^$1=.*|$1=$2|" .env
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

mkdir -p secrets mosquitto-auth
value METRICS_TOKEN | tr -d '\n' >secrets/metrics-token
[ -f inventory.yaml ] || cp ../inventory.example.yaml inventory.yaml
# The gateway's account gets the password .env already holds: mqtt-auth keeps known passwords.
if [ ! -f mosquitto-auth/credentials.csv ]; then
    printf 'username,password\ncgw-gateway,%s\n' "$(value MQTT_PASSWORD)" >mosquitto-auth/credentials.csv
fi

docker compose build gateway
# As root in the container, so the files can be given to Mosquitto's user (1883) and to you.
docker compose run --rm --no-deps --user 0 -v "$PWD/mosquitto-auth:/out" --entrypoint sh gateway -c \
    "cgw mqtt-auth --inventory /etc/cgw/inventory.yaml --out /out \
     && chown 1883:1883 /out/passwd /out/acl && chown $(id -u):$(id -g) /out/credentials.csv"

echo "ready: docker compose up -d"
echo "  dashboard  http://localhost:8080/dashboard/#token=$(value OPERATOR_TOKEN)"
echo "  grafana    http://localhost:3000 (admin / GRAFANA_ADMIN_PASSWORD in .env)"
echo "  devices    accounts in mosquitto-auth/credentials.csv"
