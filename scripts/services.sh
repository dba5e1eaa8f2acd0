#!/usr/bin/env bash
# Makes sure RabbitMQ (127.0.0.1:5672) and Redis (127.0.0.1:6379) answer:
# starts them if installed but stopped, installs them from Debian's packages if missing.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
    for _ in $(seq 1 120); do
        port_open "$1" && return 0
        sleep 0.5
    done
    echo "error: nothing answers on 127.0.0.1:$1 after 60 s ($2)" >&2
    return 1
}

apt_install() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "error: $1 is not installed; install it (Debian package $1) or run this as root" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null
}

if ! port_open 6379; then
    command -v redis-server >/dev/null || apt_install redis-server
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no
    wait_port 6379 redis
fi

if ! port_open 5672; then
    command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
    rabbitmq-server -detached
    wait_port 5672 rabbitmq
fi
