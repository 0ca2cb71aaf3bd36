#!/bin/sh
# Writes the Redis ACL file of hotreload's users from their passwords.
#
#   gen-users-acl.sh [--cluster] OUTPUT
#
# Passwords come from files named by the variable with _FILE appended (the keys of the Secret
# hotreload-redis-users mounted as a volume in Kubernetes, docker secrets in compose: what
# deploy/ ships), else from the environment variable itself:
#   HOTRELOAD_PUBLISHER_PASSWORD   the publisher sidecar (`hotreload watch`)
#   HOTRELOAD_SUBSCRIBER_PASSWORD  the Subscriber in every app worker
#   HOTRELOAD_OPERATOR_PASSWORD    optional: read-only user for hotreload status/history/wait
#   HOTRELOAD_PREFIX               key prefix (default hotreload; must match --prefix)
# and with --cluster (a node of the shared Redis Cluster, deploy/redis-cluster), also:
#   HOTRELOAD_REPLICATION_PASSWORD the user `replication` that replicas log in to their master
#                                  with (masteruser/masterauth)
#   HOTRELOAD_ADMIN_PASSWORD       the user `admin`: `redis-cli --cluster create|check`, manual
#                                  CLUSTER FAILOVER and the nodes' probes; no key, no data
# Passwords must be at least 16 of A-Z a-z 0-9 . _ ~ - (they go into unix://USER:PASSWORD@...
# URLs as they are); `openssl rand -hex 32` makes a good one. The file stores SHA-256 hashes
# only, and is written with mode 600, whole or not at all. (Redis ACL files cannot hold
# comments, so the explanation is here.)
#
# Least privilege, command by command (tests/test_deploy.py runs the real publisher,
# subscribers and CLI under these users and checks what is refused; tests/test_deploy_shared.py
# does the same on a real Redis Cluster):
#   publisher   compare-and-publish: EVALSHA (SCRIPT LOAD when the script cache is empty) whose
#               script runs XLEN + XREVRANGE + XADD on :events, and HGETALL + HSET on :head
#               (the newest entry without its content; HSET through a selector, on :head
#               only), then SPUBLISH on :notify (the shard channel subscribers in a Redis
#               Cluster wait on); EXISTS on :events every second; the
#               ack follower's XREAD/XRANGE on :acks, XREVRANGE on :events, HGETALL and
#               HLEN on :workers (HLEN: whether a worker came or went since the last status
#               pass; denied before session 8, which stalled the follower after its first
#               pass), TIME, and from its second status pass on, MULTI + XLEN + XRANGE +
#               EXEC on :acks (only what is new since the last pass); SCAN so that `hotreload
#               status` without a KEY works from the publisher container; HDEL on :workers
#               of workers not heard of for an hour (--forget-workers-after); XREAD on
#               :control (operators' rollback/promote/halt requests) and XADD of its replies
#               there; a blocking XREAD on the :events of a name no key can have
#               ($p:{~idle-check}:events, written by nobody), which the idle check is sent
#               behind (publisher/_ahead.py). Read+write on :events, :head (HSET only),
#               :workers (HDEL only) and :control, read-only on :acks; on :floor (the
#               workers' highest versions seen, a sorted set) ZRANGE in the publish script
#               (its highest score), ZSCORE in the sweep's script (does each worker's row
#               have its score there) and ZREM of the workers it forgets (HDEL above). (A
#               publisher under an ACL without :floor reads every publish's floor from
#               :workers; without :head it still
#               publishes, reading the newest entry whole: it logs a warning once.) A content
#               of 64 KiB or more goes around Lua (publisher/_fast.py): one MULTI of SCRIPT
#               LOAD x2, EVALSHA (RENAME :events to :aside, through a selector on those two
#               keys only), EVALSHA, XADD and EVALSHA (RENAME back, SPUBLISH), EXEC; refused,
#               the publisher publishes through Lua and logs a warning once.
#   subscriber  CLUSTER SLOTS, the first command on each connection (is this a cluster, and
#               which node serves the key? a standalone Redis answers with an error);
#               XREVRANGE/XRANGE/XREAD on :events (read-only: a worker can never publish),
#               XADD (with MAXLEN ~) on :acks, HSET on :workers (write-only), ZADD (GT) on
#               :floor (write-only: the highest version it has seen), CLIENT SETNAME.
#               CLIENT ID + CLIENT UNBLOCK: a process's subscribers share one connection
#               blocked in one XREAD (subscriber/_hub.py); a key starting later wakes that
#               read from a second connection (it returns as if timed out) so that it is read
#               at once. The worst a stolen subscriber password does with it is end other
#               clients' blocking reads early, which every hotreload client retries.
#               SSUBSCRIBE on the :notify shard channels (&PREFIX:{*}:notify): in a Redis
#               Cluster a process's keys share connections per master and are read when the
#               publish script announces a new entry there (subscriber/_clusterhub.py).
#               No XTRIM, XDEL, DEL, EVAL, FLUSH*, CONFIG, ... .
#   operator    read-only: EXISTS, XRANGE, XREVRANGE, XREAD, HGETALL, TIME, SCAN; and, through
#               a Redis 7 selector, XADD on :control and on no other key (`hotreload
#               rollback|promote|halt` append a request there, then XREAD the daemon's reply).
#   default     off: no password can log it in, and it may run nothing.
# PING is allowed to everybody (probes). AUTH and HELLO need no permission.
# --cluster adds what redis-py's cluster client (the publisher's and the CLI's) sends besides:
#   publisher, operator  CLUSTER SLOTS (the slot map) and COMMAND (the key positions of every
#               command), both when the client starts and after a failover.
#   replication PSYNC, REPLCONF, PING: what a replica sends its master; no key, no data
#               command. The cluster bus (port 16379) does not use ACLs at all.
#   admin       CLUSTER INFO|NODES|MEET|ADDSLOTS|SET-CONFIG-EPOCH|REPLICATE|FAILOVER|FORGET,
#               INFO, DBSIZE, PING: `redis-cli --cluster create`, `--cluster check` and
#               `--cluster add-node --cluster-slave` + CLUSTER FORGET (a node that lost its PVC
#               replaced), a manual failover, the readiness probe (cluster_state:ok). No keys:
#               it reads no config and changes nothing but the cluster's layout. Resharding
#               (MIGRATE, which needs keys; CLUSTER SETSLOT) is not included.
set -eu

cluster=
client_cluster=
if [ "${1:-}" = --cluster ]; then
    cluster=yes
    shift
fi
out=${1:?usage: gen-users-acl.sh [--cluster] OUTPUT}
prefix=${HOTRELOAD_PREFIX:-hotreload}

fail() {
    echo "gen-users-acl.sh: $*" >&2
    exit 1
}

case $prefix in
    '' | *[!A-Za-z0-9._:-]*) fail "HOTRELOAD_PREFIX '$prefix' must be letters, digits, '.', '_', ':' or '-'" ;;
esac

# password NAME [optional]: the content of the file named by ${NAME}_FILE, else (a fallback)
# the value of $NAME
password() {
    eval "value=\${$1:-}"
    eval "file=\${$1_FILE:-}"
    if [ -n "$file" ]; then
        # an optional password's file is absent when its Secret has no such key
        [ -e "$file" ] || [ "${2:-}" != optional ] || return 0
        [ -r "$file" ] || fail "$1_FILE: cannot read $file"
        value=$(cat "$file")
    fi
    if [ -z "$value" ]; then
        [ "${2:-}" = optional ] && return 0
        fail "$1 (or $1_FILE) is not set: create the Secret with the users' passwords (deploy/README.md)"
    fi
    case $value in
        *[!A-Za-z0-9._~-]*) fail "$1 may only contain A-Z a-z 0-9 . _ ~ - (it goes into a URL as it is)" ;;
    esac
    [ "${#value}" -ge 16 ] || fail "$1 is shorter than 16 characters (try: openssl rand -hex 32)"
    printf '%s' "$value"
}

sha256() {
    printf '%s' "$1" | sha256sum | cut -d ' ' -f 1
}

publisher=$(password HOTRELOAD_PUBLISHER_PASSWORD)
subscriber=$(password HOTRELOAD_SUBSCRIBER_PASSWORD)
operator=$(password HOTRELOAD_OPERATOR_PASSWORD optional)
[ "$publisher" != "$subscriber" ] || fail "the publisher and subscriber passwords must differ"
if [ -n "$cluster" ]; then
    replication=$(password HOTRELOAD_REPLICATION_PASSWORD)
    admin=$(password HOTRELOAD_ADMIN_PASSWORD)
    for other in "$publisher" "$subscriber" "$operator"; do
        [ "$replication" != "$other" ] && [ "$admin" != "$other" ] ||
            fail "the replication and admin passwords must differ from the others"
    done
    [ "$replication" != "$admin" ] || fail "the replication and admin passwords must differ"
    # redis-py's RedisCluster: the slot map and the commands' key positions
    client_cluster=" +cluster|slots +command"
fi

p=$prefix
umask 077
tmp="$out.tmp.$$"
{
    echo "user default reset off"
    echo "user publisher reset on #$(sha256 "$publisher") resetchannels" \
        "+ping +client|setname +evalsha +script|load +xadd +xrevrange +xrange +xread" \
        "+exists +hgetall +hscan +hlen +hdel +time +scan +xlen +xtrim +info +multi +exec$client_cluster" \
        "+zrange +zscore +zrem" \
        "%RW~$p:{*}:events %RW~$p:{*}:head %RW~$p:{*}:aside %R~$p:{*}:acks %RW~$p:{*}:workers" \
        "%RW~$p:{*}:floor" \
        "%RW~$p:{*}:control" "+spublish &$p:{*}:notify" "(~$p:{*}:head +hset)" \
        "(~$p:{*}:events ~$p:{*}:aside +rename)"
    echo "user subscriber reset on #$(sha256 "$subscriber") resetchannels" \
        "+ping +client|setname +client|id +client|unblock +cluster|slots" \
        "+xrevrange +xrange +xread +xadd +hset +zadd" \
        "%R~$p:{*}:events %W~$p:{*}:acks %W~$p:{*}:workers %W~$p:{*}:floor" \
        "+ssubscribe &$p:{*}:notify"
    if [ -n "$operator" ]; then
        echo "user operator reset on #$(sha256 "$operator") resetchannels" \
            "+ping +client|setname +exists +xrange +xrevrange +hgetall +hscan +time +info" \
            "+xread +scan$client_cluster" \
            "%R~$p:*" "(~$p:{*}:control +xadd)"
    fi
    if [ -n "$cluster" ]; then
        echo "user replication reset on #$(sha256 "$replication") resetchannels" \
            "+psync +replconf +ping"
        echo "user admin reset on #$(sha256 "$admin") resetchannels +ping +info +dbsize" \
            "+cluster|info +cluster|nodes +cluster|meet +cluster|addslots" \
            "+cluster|set-config-epoch +cluster|replicate +cluster|failover +cluster|forget"
    fi
} >"$tmp"
mv -f "$tmp" "$out"
echo "gen-users-acl.sh: wrote $out (users: publisher, subscriber${operator:+, operator}${cluster:+, replication, admin}; default off)" >&2
