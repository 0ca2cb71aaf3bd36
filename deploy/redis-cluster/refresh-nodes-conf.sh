#!/bin/sh
# Refreshes every node's IP in a Redis Cluster node's nodes.conf from its hostname.
#
#   refresh-nodes-conf.sh NODES_CONF [WAIT_SECONDS]
#
# The cluster bus reaches the other nodes at the IP recorded in nodes.conf, never by name,
# and a pod gets a new IP on every restart. One restarted pod is found again on its own (it
# reaches its peers at their unchanged IPs and they learn its new one), but after every pod
# restarted at once (a node pool replaced, the StatefulSet scaled to zero and back) every
# recorded IP is stale and the cluster would never form again. So before Redis starts, each
# node's IP is replaced with what its hostname (cluster-announce-hostname, which Redis records
# next to the IP) resolves to now. Peers that do not resolve yet (pods still being scheduled:
# the headless Service publishes not-ready pods as soon as they have an IP) are waited for up
# to WAIT_SECONDS (default 30), then keep their recorded IP: gossip corrects it once any node
# reaches them. Nothing to do for a new node (no nodes.conf yet). Needs getent and awk.
set -eu
conf=${1:?usage: refresh-nodes-conf.sh NODES_CONF [WAIT_SECONDS]}
wait=${2:-30}
log() { echo "refresh-nodes-conf.sh: $*" >&2; }

[ -s "$conf" ] || exit 0
command -v getent >/dev/null || { log "no getent: addresses left as recorded"; exit 0; }
# A line per node: ID IP:PORT@BUSPORT[,HOSTNAME[,AUX=VALUE...]] FLAGS ... (Redis 7.0, 7.2)
hosts=$(awk 'NF >= 8 && $2 ~ /@/ {
    n = split($2, a, ",")
    if (n > 1 && a[2] ~ /^[A-Za-z0-9.-]+$/) print a[2]
}' "$conf" | sort -u)
[ -n "$hosts" ] || { log "no hostnames recorded: addresses left as recorded"; exit 0; }

deadline=$(($(date +%s) + wait))
while :; do
    map=
    missing=
    for host in $hosts; do
        ip=$(getent hosts "$host" | awk '{ print $1; exit }') || ip=
        if [ -n "$ip" ]; then
            map="$map$host $ip
"
        else
            missing="$missing $host"
        fi
    done
    if [ -z "$missing" ] || [ "$(date +%s)" -ge "$deadline" ]; then
        break
    fi
    sleep 1
done
[ -z "$missing" ] || log "not resolved, recorded IP kept:$missing"
[ -n "$map" ] || exit 0

tmp="$conf.tmp.$$"
printf '%s' "$map" >"$tmp.map"
awk '
    NR == FNR { ip[$1] = $2; next }
    NF >= 8 && $2 ~ /@/ {
        n = split($2, a, ",")
        at = index(a[1], "@")
        address = substr(a[1], 1, at - 1)
        if (n > 1 && (a[2] in ip) && match(address, /:[0-9]+$/)) {
            field = ip[a[2]] substr(address, RSTART) substr(a[1], at)
            for (i = 2; i <= n; i++) field = field "," a[i]
            $2 = field
        }
    }
    { print }
' "$tmp.map" "$conf" >"$tmp"
rm -f "$tmp.map"
mv -f "$tmp" "$conf"
log "addresses refreshed from DNS: $(printf '%s' "$map" | tr '\n' ' ')"
