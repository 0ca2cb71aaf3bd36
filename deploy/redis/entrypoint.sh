#!/bin/sh
# Redis sidecar entry point: write the ACL users from the Secret's passwords, then run Redis.
# Works on a read-only root filesystem: the ACL file goes to /run/redis-acl (a memory-backed
# volume; redis.conf's aclfile), the AOF to /data, the socket to /var/run/hotreload. Extra
# arguments go to redis-server (e.g. --maxmemory 64mb).
set -eu
here=$(dirname "$0")
sh "$here/gen-users-acl.sh" /run/redis-acl/users.acl
exec redis-server "$here/redis.conf" "$@"
