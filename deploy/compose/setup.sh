#!/usr/bin/env bash
# Once, before the first `docker compose up -d` (docs/install.md): makes .env with fresh secrets,
# the Prometheus token file, an inventory if there is none, and the Mosquitto accounts and ACL
# (with the gateway image's `cgw mqtt-auth`). Running it again keeps every existing secret.
set -euo pipefail
cd "$(dirname "$0")"
community=${1:-}

random() { head -c 32 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 32; }
[ -f .env ] || cp .env.example .env
set_once() {  # key value: set it unless .env has a value already
    if grep -q "^$1=.\+" .env; then return; fi
    sed -i "s|^$1=.*|$1=$2|" .env
}
[ -n "$community" ] && set_once COMMUNITY "$community"
for key in INFLUX_ADMIN_PASSWORD INFLUX_TOKEN GRAFANA_ADMIN_PASSWORD OPERATOR_TOKEN METRICS_TOKEN; do
    set_once "$key" "$(random)"
done
chmod 600 .env
mkdir -p secrets mosquitto-auth
grep '^METRICS_TOKEN=' .env | cut -d= -f2- | tr -d '\n' >secrets/metrics-token
[ -f inventory.yaml ] || cp ../inventory.example.yaml inventory.yaml

docker compose build gateway
docker compose run --rm --no-deps --user "$(id -u):$(id -g)" -v "$PWD/mosquitto-auth:/out" \
    gateway mqtt-auth --inventory /etc/cgw/inventory.yaml --out /out
set_once MQTT_PASSWORD "$(awk -F, '$1 == "cgw-gateway" { print $2 }' mosquitto-auth/credentials.csv)"

echo "ready: docker compose up -d"
echo "  dashboard  http://localhost:8080/dashboard/#token=$(grep '^OPERATOR_TOKEN=' .env | cut -d= -f2-)"
echo "  grafana    http://localhost:3000 (admin, GRAFANA_ADMIN_PASSWORD in .env)"
echo "  devices    accounts in mosquitto-auth/credentials.csv"
