#!/usr/bin/env bash
# Install or upgrade cgw on a Debian 12 or Raspberry Pi OS (bookworm) box, from this checkout:
#
#   sudo deploy/install.sh --community sunrise [--influx-url URL --influx-token TOKEN] [--no-start]
#
# What it does (docs/install.md): Debian packages (Python venv, Mosquitto), a `cgw` system user,
# the gateway in /opt/cgw/.venv, settings in /etc/cgw (kept when they exist), Mosquitto with
# persistence, per-device accounts and the ACL (/etc/mosquitto/conf.d/cgw.conf, cgw-auth/), the
# hardened systemd unit, and finally `cgw doctor`. Run again to upgrade: the stores are backed up
# first (/var/backups/cgw), settings and passwords are kept, schema migrations run at start.
#
# --root DIR installs into DIR instead of / and skips apt, users and systemd (used by the tests,
# and to stage an image).
set -euo pipefail

SRC=$(cd "$(dirname "$0")/.." && pwd)
ROOT=""
COMMUNITY=""
INFLUX_URL=""
INFLUX_TOKEN=""
START=1

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --community) COMMUNITY=$2; shift 2 ;;
        --influx-url) INFLUX_URL=$2; shift 2 ;;
        --influx-token) INFLUX_TOKEN=$2; shift 2 ;;
        --no-start) START=0; shift ;;
        --root) ROOT=$(mkdir -p "$2" && cd "$2" && pwd); START=0; shift 2 ;;
        -h|--help) usage ;;
        *) echo "error: unknown option $1" >&2; usage 2 ;;
    esac
done

OPT=$ROOT/opt/cgw
ETC=$ROOT/etc/cgw
STATE=$ROOT/var/lib/cgw
BACKUPS=$ROOT/var/backups/cgw
MOSQ=$ROOT/etc/mosquitto
UNITS=$ROOT/etc/systemd/system
CGW=$OPT/.venv/bin/cgw

say() { echo "==> $*"; }
fail() { echo "error: $*" >&2; exit 1; }

# -- the machine ---------------------------------------------------------------------------------
if [ -z "$ROOT" ]; then
    [ "$(id -u)" = 0 ] || fail "run as root (sudo $0 ...)"
    [ -f /etc/debian_version ] || fail "this script is for Debian and Raspberry Pi OS"
    say "Debian packages"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv python3-pip mosquitto mosquitto-clients >/dev/null
    if ! id cgw >/dev/null 2>&1; then
        say "system user cgw"
        useradd --system --home-dir /var/lib/cgw --no-create-home --shell /usr/sbin/nologin cgw
    fi
fi
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || fail "cgw needs Python 3.11 or newer"
mkdir -p "$OPT" "$ETC" "$MOSQ/conf.d" "$UNITS"
install -d -m 0700 "$STATE" "$BACKUPS" "$MOSQ/cgw-auth"

# -- an upgrade backs up first, with the version that wrote the stores -----------------------------
if [ -x "$CGW" ] && [ -f "$STATE/cgw.sqlite3" ]; then
    say "backing up the stores into $BACKUPS"
    CGW_DATA_DIR=$STATE "$CGW" backup --config "$ETC/cgw.yaml" --out "$BACKUPS"
fi

# -- the gateway ---------------------------------------------------------------------------------
say "cgw into $OPT/.venv"
[ -x "$OPT/.venv/bin/python" ] || python3 -m venv "$OPT/.venv"
"$OPT/.venv/bin/python" -m pip install -q --upgrade pip
"$OPT/.venv/bin/python" -m pip install -q --upgrade "$SRC"

# -- settings: made once, kept on every later run -------------------------------------------------
if [ ! -f "$ETC/cgw.yaml" ]; then
    say "settings $ETC/cgw.yaml"
    [ -n "$COMMUNITY" ] || fail "first install: give --community NAME (letters, digits, . _ -)"
    registration=closed
    if [ ! -f "$ETC/inventory.yaml" ]; then
        # No device list yet: devices register by their birth message until one is written.
        registration=open
        printf 'devices: []\n' >"$ETC/inventory.yaml"
    fi
    sed -e "s|^community: .*|community: $COMMUNITY|" \
        -e "s|^registration: .*|registration: $registration|" \
        -e "s|^  url: http://127.0.0.1:8086 .*|  url: \"$INFLUX_URL\"|" \
        "$SRC/deploy/cgw.example.yaml" >"$ETC/cgw.yaml"
fi
[ -f "$ETC/inventory.yaml" ] || printf 'devices: []\n' >"$ETC/inventory.yaml"

say "MQTT accounts and ACL in $MOSQ/cgw-auth (existing passwords kept)"
CGW_DATA_DIR=$STATE "$CGW" mqtt-auth --config "$ETC/cgw.yaml" --inventory "$ETC/inventory.yaml" --out "$MOSQ/cgw-auth" >/dev/null
gateway_password=$(awk -F, '$1 == "cgw-gateway" { print $2 }' "$MOSQ/cgw-auth/credentials.csv")
install -m 0644 "$SRC/deploy/mosquitto/cgw.conf" "$MOSQ/conf.d/cgw.conf"

if [ ! -f "$ETC/cgw.env" ]; then
    say "secrets $ETC/cgw.env"
    token=$("$OPT/.venv/bin/python" -c 'import secrets; print(secrets.token_urlsafe(24))')
    umask 077
    cat >"$ETC/cgw.env" <<EOF
# Secrets of the cgw service (EnvironmentFile of cgw.service). Made by deploy/install.sh.
CGW_MQTT__PASSWORD=$gateway_password
CGW_INFLUX__TOKEN=$INFLUX_TOKEN
CGW_AUTH__TOKENS='{"$token":{"role":"operator","name":"installer"}}'
EOF
    umask 022
    NEW_TOKEN=$token
fi

chmod 0600 "$ETC/cgw.env"
if [ -z "$ROOT" ]; then
    # Secrets are root's: systemd reads the EnvironmentFile as root before it starts the service.
    chown root:root "$ETC/cgw.env"
    chown cgw:cgw "$STATE" && chmod 0700 "$STATE"
    # The broker reads its password file and ACL as its group; every device's password in plain
    # text (credentials.csv) stays root's alone.
    chown root:mosquitto "$MOSQ/cgw-auth" "$MOSQ/cgw-auth/passwd" "$MOSQ/cgw-auth/acl"
    chmod 0750 "$MOSQ/cgw-auth"
    chmod 0640 "$MOSQ/cgw-auth/passwd" "$MOSQ/cgw-auth/acl"
    chown root:root "$MOSQ/cgw-auth/credentials.csv" && chmod 0600 "$MOSQ/cgw-auth/credentials.csv"
fi

# -- the service ---------------------------------------------------------------------------------
install -m 0644 "$SRC/deploy/systemd/cgw.service" "$UNITS/cgw.service"
if [ "$START" = 1 ]; then
    say "starting mosquitto and cgw"
    systemctl daemon-reload
    systemctl enable --quiet mosquitto cgw
    systemctl restart mosquitto
    systemctl restart cgw
fi

say "cgw doctor"
# As the service will run it: its user, its secrets (read here as root, as systemd does). A WARN
# or FAIL line says what to fix.
if [ -n "$ROOT" ]; then
    (set -a; . "$ETC/cgw.env"; set +a; CGW_DATA_DIR=$STATE CGW_INVENTORY=$ETC/inventory.yaml "$CGW" doctor --config "$ETC/cgw.yaml") || true
else
    (set -a; . "$ETC/cgw.env"; set +a; runuser -u cgw -- "$CGW" doctor --config "$ETC/cgw.yaml") || true
fi

echo
echo "cgw is installed: settings $ETC/cgw.yaml, secrets $ETC/cgw.env, data $STATE"
echo "  dashboard   http://<this box>:8080/dashboard/  (the API listens on 127.0.0.1 until api.host is changed)"
if [ -n "${NEW_TOKEN:-}" ]; then
    echo "  operator token (shown once; it is in $ETC/cgw.env): $NEW_TOKEN"
fi
echo "  devices     accounts in $MOSQ/cgw-auth/credentials.csv; add devices to $ETC/inventory.yaml and run this again"
echo "  logs        journalctl -u cgw -f"
