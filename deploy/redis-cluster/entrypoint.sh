#!/bin/sh
# Entry point of a Redis Cluster node (StatefulSet hotreload-redis): write the ACL users from
# the Secret's passwords and this node's own settings, refresh the peers' addresses in
# nodes.conf, then run Redis. Works on a read-only root filesystem: users.acl and node.conf
# go to /run/redis (memory-backed), the AOF and nodes.conf to /data (the PVC). Extra arguments
# go to redis-server (e.g. --maxmemory 64mb).
#   HOTRELOAD_NODE_HOSTNAME   this pod's stable DNS name, POD.hotreload-redis-nodes.NAMESPACE.svc
#   HOTRELOAD_*_PASSWORD_FILE the users' passwords, files of the Secret's volume (or, a
#                             fallback, HOTRELOAD_*_PASSWORD: gen-users-acl.sh --cluster)
set -eu
here=$(dirname "$0")
sh "$here/gen-users-acl.sh" --cluster /run/redis/users.acl
hostname=${HOTRELOAD_NODE_HOSTNAME:?set it to the DNS name of the pod (deploy/redis-cluster)}
# validated by gen-users-acl.sh: its file (as deployed), else the variable (a fallback)
if [ -n "${HOTRELOAD_REPLICATION_PASSWORD_FILE:-}" ]; then
    replication=$(cat "$HOTRELOAD_REPLICATION_PASSWORD_FILE")
else
    replication=$HOTRELOAD_REPLICATION_PASSWORD
fi
umask 077
{
    echo "cluster-announce-hostname $hostname"
    echo "masteruser replication"
    echo "masterauth $replication"
} >/run/redis/node.conf
sh "$here/refresh-nodes-conf.sh" /data/nodes.conf
exec redis-server "$here/redis.conf" "$@"
